//! Label selector evaluation.
