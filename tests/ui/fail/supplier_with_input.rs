use bindery::prelude::*;

#[stream_function(input = "orders")]
fn tick() -> String {
    "tick".to_owned()
}

fn main() {}
