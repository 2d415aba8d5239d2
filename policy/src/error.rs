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

/// A `--probe` value that is not `PORT[/PROTOCOL]`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid probe {input:?}: {message} (expected PORT[/PROTOCOL], e.g. 80/TCP)")]
pub struct ProbeParseError {
    pub input: String,
    pub message: String,
}
