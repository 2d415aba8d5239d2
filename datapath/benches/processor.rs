//! Per-packet `Processor::process` cost (filled in below).
fn main() {}
