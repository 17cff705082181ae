use bindery::prelude::*;

#[stream_function]
fn bill<T: serde::de::DeserializeOwned>(order: T) -> String {
    let _ = order;
    String::new()
}

fn main() {}
