pub mod pki;
pub mod policy;
