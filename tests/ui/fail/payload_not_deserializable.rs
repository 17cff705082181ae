use bindery::prelude::*;

struct Order {
    id: u64,
}

#[stream_function]
fn bill(order: Order) -> String {
    order.id.to_string()
}

fn main() {}
