use bindery::prelude::*;

#[stream_function]
struct Billing;

fn main() {}
