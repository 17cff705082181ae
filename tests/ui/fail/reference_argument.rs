use bindery::prelude::*;

#[stream_function]
fn bill(order: &str) -> String {
    order.to_owned()
}

fn main() {}
