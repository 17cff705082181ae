use bindery::prelude::*;

struct Failed;

#[stream_function]
fn bill(text: String) -> Result<String, Failed> {
    if text.is_empty() {
        return Err(Failed);
    }
    Ok(text)
}

fn main() {}
