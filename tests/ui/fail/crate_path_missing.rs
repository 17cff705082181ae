use bindery::stream_function;

#[stream_function(crate = "no_such_crate", input = "orders")]
async fn audit(order: String) {
    let _ = order;
}

fn main() {}
