use bindery::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    id: u64,
}

#[derive(Serialize)]
struct Invoice {
    order_id: u64,
}

#[stream_function(name = "billing", input = "orders", output = "invoices", group = "billing")]
async fn bill(order: Order) -> Result<Invoice, std::io::Error> {
    Ok(Invoice { order_id: order.id })
}

#[stream_function]
fn raw(bytes: Bytes, headers: Headers) -> Vec<u8> {
    let _ = headers;
    bytes.to_vec()
}

#[stream_function]
fn fan_out(message: Message<Order>) -> Vec<Message<Invoice>> {
    vec![Message::new(Invoice { order_id: message.payload().id })]
}

#[stream_function]
async fn maybe(order: Order, bridge: StreamBridge, config: AppConfig) -> Option<Invoice> {
    let _ = (bridge, config);
    (order.id > 0).then_some(Invoice { order_id: order.id })
}

#[stream_function]
async fn sink(order: Order) -> Result<(), String> {
    let _ = order.id;
    Ok(())
}

#[stream_function(poll = "250ms")]
fn ticker() -> Option<Message<String>> {
    Some(Message::builder("tick".to_owned()).key("clock").build())
}

fn main() {
    let names: Vec<String> = bindery::registered_functions().iter().map(|f| f.name().to_owned()).collect();
    assert_eq!(
        names,
        ["billing", "counts", "fan_out", "from_a_macro", "maybe", "raw", "sink", "ticker"]
    );
}

mod own {
    /// The application's own type named like one of bindery's context types.
    #[derive(serde::Deserialize)]
    pub struct Headers {
        pub count: u32,
    }
}

#[stream_function(input = "counts")]
async fn counts(headers: bindery::Decoded<own::Headers>) {
    let _ = headers.0.count;
}

/// Types handed in through a `macro_rules!` carry that macro's hygiene.
macro_rules! forwarder {
    ($name:ident, $payload:ident, $out:ident) => {
        #[stream_function]
        async fn $name(order: $payload) -> $out {
            order.id.to_string()
        }
    };
}
forwarder!(from_a_macro, Order, String);
