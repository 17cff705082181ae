use bindery::prelude::*;

#[stream_function]
fn nothing() {}

fn main() {}
