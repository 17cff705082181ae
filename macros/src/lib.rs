//! `#[stream_function]`: registers a plain function with the bindery runtime.
//!
//! The attribute is thin sugar over `bindery::StreamFunction` and
//! `bindery::FunctionRegistration`; see the `bindery` crate for the hand-written equivalent.

use proc_macro::TokenStream;

mod expand;

/// Binds a function to destinations from configuration.
///
/// Attributes, all optional: `name` (default: the function's name), `input` and `output`
/// (default destinations of `<name>-in-0` and `<name>-out-0`), `group` (default consumer
/// group), `poll` (how often a supplier is called, such as `"500ms"`; default `"1s"`).
///
/// The shape follows from the signature: a function with a payload argument that returns a
/// value is a *function*; one that returns `()` or `Result<(), E>` is a *consumer*; one without
/// a payload argument is a *supplier*.
#[proc_macro_attribute]
pub fn stream_function(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::stream_function(args.into(), item.into()).into()
}
