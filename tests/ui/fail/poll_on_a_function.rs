use bindery::prelude::*;

#[stream_function(poll = "1s")]
fn bill(text: String) -> String {
    text
}

fn main() {}
