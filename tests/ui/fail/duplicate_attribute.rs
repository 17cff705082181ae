use bindery::prelude::*;

#[stream_function(input = "orders", input = "orders-v2")]
fn bill(text: String) -> String {
    text
}

fn main() {}
