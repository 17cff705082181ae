use bindery::prelude::*;

struct Invoice;

#[stream_function]
fn bill(_text: String) -> Invoice {
    Invoice
}

fn main() {}
