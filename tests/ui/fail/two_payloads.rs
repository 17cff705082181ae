use bindery::prelude::*;

#[stream_function]
fn bill(order: String, invoice: String) -> String {
    order + &invoice
}

fn main() {}
