use bindery::prelude::*;

#[stream_function(inptu = "orders")]
fn bill(text: String) -> String {
    text
}

fn main() {}
