use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, LitStr, Meta, PathArguments, ReturnType, Token, Type};

const ATTRIBUTES: &[&str] = &["name", "input", "output", "group", "poll", "crate"];

/// Expands the attribute; on error, the user's function is still emitted unchanged so the
/// rest of the crate keeps compiling and IDEs keep working.
pub(crate) fn stream_function(args: TokenStream, item: TokenStream) -> TokenStream {
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            let error = syn::Error::new(
                Span::call_site(),
                "#[stream_function] goes on a function (`fn` or `async fn`)",
            );
            return with_error(item, error);
        }
    };
    match expand(args, &function) {
        Ok(tokens) => tokens,
        Err(error) => with_error(function.into_token_stream(), error),
    }
}

fn with_error(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.into_compile_error();
    quote! { #item #error }
}

#[derive(Default)]
struct Attributes {
    name: Option<LitStr>,
    input: Option<LitStr>,
    output: Option<LitStr>,
    group: Option<LitStr>,
    poll: Option<LitStr>,
    /// The path of the `bindery` crate, for a dependency renamed in `Cargo.toml`.
    krate: Option<LitStr>,
}

impl Attributes {
    /// `<bindery>::__private`, by the path `crate = "..."` gives, else `::bindery`.
    fn private(&self) -> syn::Result<TokenStream> {
        match &self.krate {
            None => Ok(quote!(::bindery::__private)),
            Some(path) => {
                let root: syn::Path = path.parse().map_err(|_| {
                    syn::Error::new(
                        path.span(),
                        "`crate` takes the path of the bindery crate, such as `crate = \"stream_kit\"`",
                    )
                })?;
                Ok(quote_spanned!(path.span()=> #root::__private))
            }
        }
    }
}

fn parse_attributes(args: TokenStream) -> syn::Result<Attributes> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    let mut attributes = Attributes::default();
    let mut errors: Option<syn::Error> = None;
    let mut push = |error: syn::Error| match &mut errors {
        Some(all) => all.combine(error),
        None => errors = Some(error),
    };
    for meta in metas {
        let Meta::NameValue(pair) = &meta else {
            push(syn::Error::new(
                meta.span(),
                format!("expected `key = \"value\"`, with a key among {}", allowed()),
            ));
            continue;
        };
        let key = pair
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let slot = match key.as_str() {
            "name" => &mut attributes.name,
            "input" => &mut attributes.input,
            "output" => &mut attributes.output,
            "group" => &mut attributes.group,
            "poll" => &mut attributes.poll,
            "crate" => &mut attributes.krate,
            _ => {
                push(syn::Error::new(
                    pair.path.span(),
                    format!(
                        "unknown attribute `{}`; expected one of {}",
                        pair.path.to_token_stream(),
                        allowed()
                    ),
                ));
                continue;
            }
        };
        let value = match &pair.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(text),
                ..
            }) => text.clone(),
            other => {
                push(syn::Error::new(
                    other.span(),
                    format!("`{key}` takes a string, such as `{key} = \"...\"`"),
                ));
                continue;
            }
        };
        if value.value().trim().is_empty() {
            push(syn::Error::new(
                value.span(),
                format!("`{key}` must not be empty"),
            ));
            continue;
        }
        if slot.is_some() {
            push(syn::Error::new(
                pair.path.span(),
                format!("`{key}` is given twice"),
            ));
            continue;
        }
        *slot = Some(value);
    }
    match errors {
        Some(errors) => Err(errors),
        None => Ok(attributes),
    }
}

fn allowed() -> String {
    ATTRIBUTES
        .iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Return types the macro understands by name; any other may be an alias of one of them.
const KNOWN_RETURN_NAMES: &[&str] = &["String", "Bytes", "Vec", "Result", "Option", "Message"];

/// How an argument is taken from the message.
enum Argument {
    /// The payload, decoded into a plain type: the handler takes `Decoded<T>` and unwraps it.
    Decoded(Type),
    /// `Message<T>` of a plain type: the handler takes `Message<Decoded<T>>` and unwraps it.
    MessageOfDecoded(Type),
    /// A raw payload (`String`, `Bytes`, `Vec<u8>`), `Decoded<T>` or a raw `Message<..>`: the
    /// payload, taken as it is.
    AsIs(Type),
    /// Context (`Headers`, `StreamBridge`, `AppConfig`, `Context`), by its name: taken as it is,
    /// and checked to be bindery's type of that name.
    Context(Type),
}

const CONTEXT_TYPES: &[&str] = &["Headers", "StreamBridge", "AppConfig", "Context"];

/// Whether `argument` can show the input's headers: a decoded payload, a raw payload and
/// context other than `Headers` cannot; anything else may. Told by the names the macro
/// classified the argument by (context types are checked to be bindery's by `ContextArgument`),
/// rather than by asking `FromMessage::READS_HEADERS` in the generated code, which would
/// report an argument type that does not fit twice.
fn argument_reads_headers(argument: &Argument) -> bool {
    let named = |ty: &Type| last_segment(ty).map(|s| s.ident.to_string());
    match argument {
        Argument::Decoded(_) => false,
        Argument::MessageOfDecoded(_) => true,
        Argument::AsIs(ty) => !matches!(
            named(ty).as_deref(),
            Some("String" | "Bytes" | "Vec" | "Decoded")
        ),
        Argument::Context(ty) => named(ty).as_deref() == Some("Headers"),
    }
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(path) if path.qself.is_none() => path.path.segments.last(),
        _ => None,
    }
}

fn generic_args(segment: &syn::PathSegment) -> Vec<&Type> {
    match &segment.arguments {
        PathArguments::AngleBracketed(args) => args
            .args
            .iter()
            .filter_map(|a| match a {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn is_raw_payload(ty: &Type) -> bool {
    let Some(segment) = last_segment(ty) else {
        return false;
    };
    match segment.ident.to_string().as_str() {
        "String" | "Bytes" => true,
        "Vec" => matches!(generic_args(segment).as_slice(), [inner] if is_named(inner, "u8")),
        _ => false,
    }
}

/// The payload type an argument decodes, for its JSON Schema: `None` for bytes, a raw
/// message and context.
fn input_payload(argument: &Argument) -> Option<Type> {
    match argument {
        Argument::Decoded(ty) | Argument::MessageOfDecoded(ty) => Some(ty.clone()),
        Argument::AsIs(ty) if is_named(ty, "String") => Some(ty.clone()),
        Argument::AsIs(ty) => match last_segment(ty) {
            Some(segment) if segment.ident == "Decoded" => {
                generic_args(segment).first().map(|inner| (*inner).clone())
            }
            _ => None,
        },
        Argument::Context(_) => None,
    }
}

/// The payload type each message a return type sends has, for its JSON Schema: through
/// `Result`, `Option`, `Vec` and `Message`; `None` for nothing sent, bytes and raw messages.
fn output_payload(ty: &Type) -> Option<Type> {
    if is_unit(ty) || matches!(ty, Type::Reference(_) | Type::ImplTrait(_)) {
        return None;
    }
    let Some(segment) = last_segment(ty) else {
        return Some(ty.clone());
    };
    let args = generic_args(segment);
    match (segment.ident.to_string().as_str(), args.as_slice()) {
        ("String", []) => Some(ty.clone()),
        ("Bytes", []) | ("Message", []) => None,
        ("Vec", [inner]) if is_named(inner, "u8") => None,
        ("Result", [inner, ..]) | ("Option", [inner]) | ("Vec", [inner]) => output_payload(inner),
        ("Message", [inner]) if is_raw_payload(inner) && !is_named(inner, "String") => None,
        ("Message", [inner]) => output_payload(inner),
        _ => Some(ty.clone()),
    }
}

fn is_named(ty: &Type, name: &str) -> bool {
    last_segment(ty).is_some_and(|s| s.ident == name && s.arguments.is_none())
}

fn classify_argument(ty: &Type) -> syn::Result<Argument> {
    match ty {
        Type::Reference(reference) => {
            return Err(syn::Error::new(
                reference.span(),
                "stream function arguments are taken by value: remove the `&`",
            ))
        }
        Type::ImplTrait(_) => {
            return Err(syn::Error::new(
                ty.span(),
                "`impl Trait` cannot be a stream function argument: name the type",
            ))
        }
        _ => {}
    }
    let Some(segment) = last_segment(ty) else {
        return Ok(Argument::Decoded(ty.clone()));
    };
    let name = segment.ident.to_string();
    if CONTEXT_TYPES.contains(&name.as_str()) {
        return Ok(Argument::Context(ty.clone()));
    }
    if name == "Decoded" {
        return Ok(Argument::AsIs(ty.clone()));
    }
    if is_raw_payload(ty) {
        return Ok(Argument::AsIs(ty.clone()));
    }
    // `Arc<Message>`: the message as received, shared.
    if name == "Arc" {
        let shares_the_message = match generic_args(segment).as_slice() {
            [inner] => last_segment(inner).is_some_and(|inner| {
                inner.ident == "Message"
                    && match generic_args(inner).as_slice() {
                        [] => true,
                        [payload] => is_named(payload, "Bytes"),
                        _ => false,
                    }
            }),
            _ => false,
        };
        if shares_the_message {
            return Ok(Argument::AsIs(ty.clone()));
        }
    }
    if name == "Message" {
        return match generic_args(segment).as_slice() {
            [] => Ok(Argument::AsIs(ty.clone())),
            [inner] if is_raw_payload(inner) => Ok(Argument::AsIs(ty.clone())),
            [inner] => Ok(Argument::MessageOfDecoded((*inner).clone())),
            _ => Err(syn::Error::new(
                segment.span(),
                "`Message` takes one payload type: `Message<T>`",
            )),
        };
    }
    Ok(Argument::Decoded(ty.clone()))
}

/// Whether a return type means "nothing to send": `()`, or `Result<(), E>`.
fn returns_nothing(output: &ReturnType) -> bool {
    match output {
        ReturnType::Default => true,
        ReturnType::Type(_, ty) => is_unit(ty) || result_of_unit(ty),
    }
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(tuple) if tuple.elems.is_empty())
}

fn result_of_unit(ty: &Type) -> bool {
    last_segment(ty)
        .filter(|s| s.ident == "Result")
        .is_some_and(|s| matches!(generic_args(s).first(), Some(inner) if is_unit(inner)))
}

/// The expression turning a value of `ty` into something that implements `IntoOutputs`:
/// plain values are wrapped in `Encoded`, containers are mapped through.
fn convert_output(
    private: &TokenStream,
    ty: &Type,
    value: TokenStream,
    depth: usize,
) -> syn::Result<TokenStream> {
    let v = format_ident!("__bindery_value_{}", depth);
    if is_unit(ty) {
        return Ok(value);
    }
    if let Type::ImplTrait(_) = ty {
        return Err(syn::Error::new(
            ty.span(),
            "`impl Trait` cannot be returned from a stream function: name the type",
        ));
    }
    if let Type::Reference(reference) = ty {
        let is_static_str = reference
            .lifetime
            .as_ref()
            .is_some_and(|l| l.ident == "static")
            && is_named(&reference.elem, "str");
        if is_static_str {
            return Ok(value);
        }
        return Err(syn::Error::new(
            ty.span(),
            "stream functions return owned values: remove the `&`",
        ));
    }
    let Some(segment) = last_segment(ty) else {
        return Ok(quote_spanned!(ty.span()=> #private::Encoded(#value)));
    };
    let args = generic_args(segment);
    match (segment.ident.to_string().as_str(), args.as_slice()) {
        ("String" | "Bytes", []) => Ok(value),
        ("Vec", [inner]) if is_named(inner, "u8") => Ok(quote!(#private::Bytes::from(#value))),
        ("Result", [inner, ..]) | ("Option", [inner]) => {
            let mapped = convert_output(private, inner, quote!(#v), depth + 1)?;
            Ok(quote!(#value.map(|#v| #mapped)))
        }
        ("Vec", [inner]) => {
            let mapped = convert_output(private, inner, quote!(#v), depth + 1)?;
            Ok(quote!(#value.into_iter().map(|#v| #mapped).collect::<::std::vec::Vec<_>>()))
        }
        ("Message", []) => Ok(value),
        ("Message", [inner]) => {
            if is_raw_payload(inner) {
                if is_named(inner, "String") || is_named(inner, "Bytes") {
                    return Ok(value);
                }
                return Ok(quote!(#value.map_payload(#private::Bytes::from)));
            }
            Ok(quote!(#value.map_payload(#private::Encoded)))
        }
        _ => Ok(quote_spanned!(ty.span()=> #private::Encoded(#value))),
    }
}

/// The type `convert_output` produces for a value of `ty`, for the compile-time check that
/// points at the return type when it cannot be sent.
fn converted_output_type(private: &TokenStream, ty: &Type) -> TokenStream {
    if is_unit(ty) {
        return quote!(());
    }
    if let Type::Reference(_) = ty {
        return quote!(#ty);
    }
    let Some(segment) = last_segment(ty) else {
        return quote!(#private::Encoded<#ty>);
    };
    let args = generic_args(segment);
    match (segment.ident.to_string().as_str(), args.as_slice()) {
        ("String" | "Bytes", []) => quote!(#ty),
        ("Vec", [inner]) if is_named(inner, "u8") => quote!(#private::Bytes),
        ("Result", [inner, error]) => {
            let inner = converted_output_type(private, inner);
            quote!(::std::result::Result<#inner, #error>)
        }
        ("Option", [inner]) => {
            let inner = converted_output_type(private, inner);
            quote!(::std::option::Option<#inner>)
        }
        ("Vec", [inner]) => {
            let inner = converted_output_type(private, inner);
            quote!(::std::vec::Vec<#inner>)
        }
        ("Message", []) => quote!(#ty),
        ("Message", [inner]) if is_named(inner, "String") || is_named(inner, "Bytes") => {
            quote!(#ty)
        }
        ("Message", [inner]) if is_raw_payload(inner) => quote!(#private::Message<#private::Bytes>),
        ("Message", [inner]) => quote!(#private::Message<#private::Encoded<#inner>>),
        // `Result<T>` aliases and anything else: leave the check to the handler bound.
        ("Result", _) => quote!(_),
        _ => quote!(#private::Encoded<#ty>),
    }
}

/// Gives every token `span`, so errors about generated types point at the user's code.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

fn expand(args: TokenStream, function: &ItemFn) -> syn::Result<TokenStream> {
    let attributes = parse_attributes(args)?;
    let signature = &function.sig;
    let ident = &signature.ident;
    if let Some(receiver) = signature.receiver() {
        return Err(syn::Error::new(
            receiver.span(),
            "a stream function is a free function: it cannot take `self`",
        ));
    }
    if !signature.generics.params.is_empty() {
        return Err(syn::Error::new(
            signature.generics.span(),
            "a stream function cannot be generic: the runtime must know the payload type",
        ));
    }
    if let Some(variadic) = &signature.variadic {
        return Err(syn::Error::new(
            variadic.span(),
            "a stream function cannot be variadic",
        ));
    }
    if signature.unsafety.is_some() {
        return Err(syn::Error::new(
            signature.unsafety.span(),
            "a stream function cannot be `unsafe`",
        ));
    }

    let private = attributes.private()?;
    // The generated handler's own names, resolved where the macro is called (never at the
    // user's tokens, whose hygiene may differ when the function comes from a `macro_rules!`).
    let message = Ident::new("__bindery_message", Span::call_site());
    let context = Ident::new("__bindery_context", Span::call_site());
    let value = Ident::new("__bindery_value", Span::call_site());
    // Each argument is taken from the message (and context) by a function called at the
    // argument's type, so a type that does not fit is one error there.
    let mut takes = Vec::new();
    let mut call_args = Vec::new();
    let mut payload: Option<Span> = None;
    let mut input_type: Option<Type> = None;
    let mut context_named: Option<String> = None;
    // Whether an argument can show the input's headers, read from its kind and name: an
    // argument the macro cannot tell counts as one that can.
    let mut reads_headers = false;
    for (index, input) in signature.inputs.iter().enumerate() {
        let FnArg::Typed(typed) = input else { continue };
        let name = format_ident!("__bindery_arg_{}", index);
        let argument = classify_argument(&typed.ty)?;
        let is_payload = !matches!(argument, Argument::Context(_));
        if is_payload {
            if payload.is_some() {
                return Err(syn::Error::new(
                    typed.ty.span(),
                    "a stream function takes at most one payload argument; other arguments may be `Headers`, `StreamBridge` or `AppConfig`",
                ));
            }
            payload = Some(typed.ty.span());
            input_type = input_payload(&argument);
        }
        reads_headers |= argument_reads_headers(&argument);
        let (take, ty) = match argument {
            Argument::Decoded(ty) => (quote!(decode), ty),
            Argument::MessageOfDecoded(ty) => (quote!(decode_message), ty),
            Argument::AsIs(ty) => (quote!(extract), ty),
            Argument::Context(ty) => {
                context_named = last_segment(&ty).map(|s| s.ident.to_string());
                (quote!(context), ty)
            }
        };
        takes.push(quote_spanned!(ty.span()=>
            let #name = #private::#take::<#ty>(&#message, &#context)?;
        ));
        call_args.push(quote!(#name));
    }

    let nothing_out = returns_nothing(&signature.output);
    let (constructor, kind) = match (payload.is_some(), nothing_out) {
        (false, true) => {
            let hint = match context_named {
                Some(name) => format!("; `{name}` is taken for bindery's context type of that name: if it is your payload, write `Decoded<{name}>`"),
                None => String::new(),
            };
            return Err(syn::Error::new(
                signature.output.span().join(ident.span()).unwrap_or(ident.span()),
                format!("a stream function without a payload argument is a supplier and must return a value to send; add a payload argument to make it a consumer{hint}"),
            ));
        }
        (false, false) => (quote!(supplier), "supplier"),
        (true, true) => (quote!(consumer), "consumer"),
        (true, false) => (quote!(function), "function"),
    };
    if kind == "consumer" {
        if let Some(output) = &attributes.output {
            return Err(syn::Error::new(
                output.span(),
                "a consumer sends nothing: remove `output`, or return a value",
            ));
        }
    }
    if kind == "supplier" {
        if let Some(input) = &attributes.input {
            return Err(syn::Error::new(
                input.span(),
                "a supplier takes no message: remove `input`, or add a payload argument",
            ));
        }
        if let Some(group) = &attributes.group {
            return Err(syn::Error::new(
                group.span(),
                "a supplier has no input, so no group: remove `group`",
            ));
        }
    } else if let Some(poll) = &attributes.poll {
        return Err(syn::Error::new(
            poll.span(),
            "only a supplier (no payload argument) is polled: remove `poll`",
        ));
    }

    let output_ty = match &signature.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let call = if signature.asyncness.is_some() {
        quote!(#ident(#(#call_args),*).await)
    } else {
        // A plain `fn` may block: it runs on the blocking pool, never on a runtime worker.
        quote!(#private::call_blocking(move || #ident(#(#call_args),*)).await)
    };
    let converted = convert_output(&private, &output_ty, quote!(__bindery_returned), 0)?;
    let converted_ty = respan(
        converted_output_type(&private, &output_ty),
        output_ty.span(),
    );
    let outputs = quote_spanned!(output_ty.span()=>
        #private::outputs::<#converted_ty>(#value, &#context)
    );

    let name = attributes
        .name
        .map(|n| n.into_token_stream())
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()).into_token_stream());
    let setters = [
        ("input", &attributes.input),
        ("output", &attributes.output),
        ("group", &attributes.group),
        ("poll", &attributes.poll),
    ]
    .into_iter()
    .filter_map(|(setter, value)| {
        let setter = format_ident!("{}", setter);
        value.as_ref().map(|v| quote!(.#setter(#v)))
    });
    let schema = |direction: TokenStream, ty: Option<Type>| match ty {
        Some(ty) => quote!(#private::schema_of!(#direction #ty)),
        None => quote!(::std::option::Option::None),
    };
    let schemas = {
        let input = schema(quote!(input), input_type);
        let output = schema(quote!(output), output_payload(&output_ty));
        quote!(.payload_schemas(#input, #output))
    };
    // The generated handler takes the whole message, so it would count as one that reads it.
    let reads_headers = match reads_headers {
        true => quote!(),
        false => quote!(.reads_headers(false)),
    };
    let register = format_ident!("__bindery_stream_function_{}", ident);
    // A return type the macro reads by a name it does not know may be an alias of `Result`,
    // `Option` or `Vec`, which it would send as one JSON value: refused when the application
    // is built.
    let alias_check = match last_segment(&output_ty).map(|s| s.ident.to_string()) {
        Some(name) if !KNOWN_RETURN_NAMES.contains(&name.as_str()) => quote! {
            let __bindery_function = match #private::hidden_container::<#output_ty>() {
                ::std::option::Option::Some(why) => __bindery_function.refused(why),
                ::std::option::Option::None => __bindery_function,
            };
        },
        _ => quote!(),
    };

    Ok(quote! {
        #function

        #[doc(hidden)]
        #[allow(non_snake_case, clippy::unused_unit)]
        fn #register() -> #private::StreamFunction {
            async fn __bindery_handler(
                #message: ::std::sync::Arc<#private::Message>,
                #context: #private::Context,
            ) -> ::std::result::Result<#private::Outputs, #private::Failure> {
                #(#takes)*
                ::std::mem::drop(#message);
                let __bindery_returned = #call;
                let #value = #converted;
                #outputs
            }
            let __bindery_function = #private::StreamFunction::#constructor(#name, __bindery_handler)
                #(#setters)*
                #schemas
                #reads_headers;
            #alias_check
            __bindery_function
        }

        #private::inventory::submit! {
            #private::FunctionRegistration::new(#register)
        }
    })
}
