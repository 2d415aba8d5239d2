pub mod flows;
pub mod picture;
pub mod pki;
pub mod policy;
pub mod run;
pub mod status;
