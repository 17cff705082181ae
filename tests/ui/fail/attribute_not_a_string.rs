use bindery::prelude::*;

#[stream_function(poll = 5)]
fn tick() -> String {
    "tick".to_owned()
}

fn main() {}
