use thiserror::Error;

/// An object the engine refused, naming the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{kind} {object}: {field}: {message}")]
pub struct PolicyError {
    /// `NetworkPolicy`, `Pod`, `Namespace`, `Workload`.
    pub kind: &'static str,
    /// `namespace/name`, or `<unnamed>`.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}
