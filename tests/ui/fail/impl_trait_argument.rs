use bindery::prelude::*;

#[stream_function]
fn bill(text: impl Into<String>) -> String {
    text.into()
}

fn main() {}
