use bindery::prelude::*;

struct Billing;

impl Billing {
    #[stream_function]
    fn bill(&self, text: String) -> String {
        text
    }
}

fn main() {}
