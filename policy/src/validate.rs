//! Validation and defaulting, as the API server does it.
