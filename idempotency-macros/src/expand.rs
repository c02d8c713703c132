//! Expansion: add the route's policy to the actix-web route attribute below.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::{
    parse::Parser, punctuated::Punctuated, Attribute, Expr, ExprLit, ItemFn, Lit, LitStr, Meta,
    Token,
};

use crate::args::{self, MarkerArgs};

/// Which attribute is being expanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marker {
    Idempotent,
    Exempt,
    Manual,
}

impl Marker {
    fn attribute(self) -> &'static str {
        match self {
            Self::Idempotent => "idempotent",
            Self::Exempt => "idempotency_exempt",
            Self::Manual => "idempotency_manual",
        }
    }

    fn from_attribute(attr: &Attribute) -> Option<Self> {
        match last_segment(attr)?.as_str() {
            "idempotent" => Some(Self::Idempotent),
            "idempotency_exempt" => Some(Self::Exempt),
            "idempotency_manual" => Some(Self::Manual),
            _ => None,
        }
    }
}

/// The actix-web attributes that register a single route and accept `wrap = ".."`.
const ROUTE_ATTRIBUTES: &[&str] = &[
    "route", "get", "post", "put", "patch", "delete", "head", "options", "trace", "connect",
];

fn last_segment(attr: &Attribute) -> Option<String> {
    attr.path()
        .segments
        .last()
        .map(|segment| segment.ident.to_string())
}

pub(crate) fn expand(marker: Marker, args: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(marker, args, item.clone()) {
        Ok(expanded) => expanded,
        // Keep the item so that rust-analyzer and later errors still see the handler.
        Err(error) => {
            let error = error.to_compile_error();
            quote! { #error #item }
        }
    }
}

fn try_expand(marker: Marker, args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let args = args::parse(marker, args)?;
    let mut function: ItemFn = syn::parse2(item)?;

    if let Some(other) = function
        .attrs
        .iter()
        .find(|attr| Marker::from_attribute(attr).is_some())
    {
        let message = match Marker::from_attribute(other) {
            Some(same) if same == marker => format!("`#[{}]` is given twice", marker.attribute()),
            _ => format!(
                "`#[{}]` conflicts with this attribute: a handler takes one of `#[idempotent]`, \
                 `#[idempotency_exempt]` and `#[idempotency_manual]`",
                marker.attribute()
            ),
        };
        return Err(syn::Error::new_spanned(other, message));
    }

    if let Some(routes) = function
        .attrs
        .iter()
        .find(|attr| last_segment(attr).as_deref() == Some("routes"))
    {
        return Err(syn::Error::new_spanned(
            routes,
            format!(
                "`#[{}]` does not support `#[routes]`; register the routes by hand and wrap them \
                 with `idempotency_actix::IdempotencyPolicy`",
                marker.attribute()
            ),
        ));
    }

    let Some(route) = function.attrs.iter_mut().find(|attr| {
        last_segment(attr).is_some_and(|name| ROUTE_ATTRIBUTES.contains(&name.as_str()))
    }) else {
        // The call site is the attribute itself: the offending, misplaced token.
        return Err(syn::Error::new(
            proc_macro2::Span::call_site(),
            format!(
                "`#[{0}]` must be placed above an actix-web route attribute, like\n\
                 #[{0}]\n#[post(\"/orders\")]\nasync fn {1}(..)\n\
                 Below the route attribute it cannot reach the route. For routes registered by \
                 hand, wrap them with `idempotency_actix::IdempotencyPolicy` instead.",
                marker.attribute(),
                function.sig.ident
            ),
        ));
    };

    let Meta::List(list) = &mut route.meta else {
        return Err(syn::Error::new_spanned(
            &route,
            "the route attribute needs its path, like `#[post(\"/orders\")]`",
        ));
    };
    if marker != Marker::Exempt {
        if let Some(methods) = only_safe_methods(&list.path, &list.tokens) {
            return Err(syn::Error::new_spanned(
                &route,
                format!(
                    "`#[{}]` has no effect on {} routes: safe methods (GET, HEAD, OPTIONS, TRACE) \
                     never carry idempotency keys and the middleware passes them through; \
                     remove it",
                    marker.attribute(),
                    methods.join(" and ")
                ),
            ));
        }
    }
    let span = list.delimiter.span().join();
    let mut policy = policy_expression(marker, &args);
    if marker != Marker::Exempt && takes_a_transaction(&function.sig) {
        policy.push_str(".in_transaction()");
    }
    let policy = LitStr::new(&policy, span);
    list.tokens = match marker {
        // Nothing to settle: the exempt policy only has to be reached while routing runs, so
        // it goes outermost.
        Marker::Exempt => with_wraps(&list.tokens, None, Some(&policy)),
        // The policy innermost, after every other middleware of the route, so that the key is
        // settled once authentication ran; with other middleware on the route (which may defer
        // calling it), a claim outermost too, so that enforce mode learns during routing that
        // the route settles its key itself.
        Marker::Idempotent | Marker::Manual => {
            let claim = has_wraps(&list.tokens).then(|| {
                LitStr::new(
                    "::idempotency_actix::__private::IdempotencyPolicy::route_claim()",
                    span,
                )
            });
            with_wraps(&list.tokens, Some(&policy), claim.as_ref())
        }
    };
    Ok(function.into_token_stream())
}

/// Whether the route attribute's arguments hold a `wrap = ..` of the user's (any argument this
/// crate cannot read counts as one).
fn has_wraps(arguments: &TokenStream) -> bool {
    let Ok(parsed) = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(arguments.clone())
    else {
        return true;
    };
    parsed.iter().any(|argument| match argument {
        Expr::Assign(assign) => {
            matches!(&*assign.left, Expr::Path(left) if left.path.is_ident("wrap"))
        }
        _ => false,
    })
}

/// The route attribute's arguments with `innermost` as the first `wrap` (right after the path)
/// and `outermost` as the last one: actix-web applies them in order, the first innermost.
fn with_wraps(
    arguments: &TokenStream,
    innermost: Option<&LitStr>,
    outermost: Option<&LitStr>,
) -> TokenStream {
    let outermost = outermost.map(|wrap| quote! { wrap = #wrap });
    let innermost = innermost.map(|wrap| quote! { wrap = #wrap });
    let parsed = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(arguments.clone());
    let Ok(parsed) = parsed else {
        // actix-web reports the arguments it cannot read itself; ours go at the end.
        let mut tokens: Vec<_> = arguments.clone().into_iter().collect();
        if matches!(tokens.last(), Some(proc_macro2::TokenTree::Punct(p)) if p.as_char() == ',') {
            tokens.pop();
        }
        let ours = innermost.into_iter().chain(outermost);
        return quote! { #(#tokens)* #(, #ours)* };
    };
    let mut arguments = parsed.into_iter();
    let path = arguments.next();
    let items = path
        .map(|path| quote! { #path })
        .into_iter()
        .chain(innermost)
        .chain(arguments.map(|argument| quote! { #argument }))
        .chain(outermost);
    quote! { #(#items),* }
}

/// The methods that the middleware passes through untouched: a key on them is never read.
const SAFE_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "TRACE"];

/// The route's methods when all of them are safe (`#[get]`, `#[head]`, `#[options]`, `#[trace]`,
/// or `#[route(.., method = "GET", ..)]` listing only safe methods); `None` when any is not, or
/// when the arguments cannot be read (actix-web reports those itself).
fn only_safe_methods(route: &syn::Path, arguments: &TokenStream) -> Option<Vec<String>> {
    let name = route.segments.last()?.ident.to_string();
    if name != "route" {
        let method = name.to_ascii_uppercase();
        return SAFE_METHODS
            .contains(&method.as_str())
            .then(|| vec![method]);
    }
    let arguments = Punctuated::<Expr, Token![,]>::parse_terminated
        .parse2(arguments.clone())
        .ok()?;
    let methods: Vec<String> = arguments
        .iter()
        .filter_map(|argument| match argument {
            Expr::Assign(assign) => match (&*assign.left, &*assign.right) {
                (
                    Expr::Path(left),
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(method),
                        ..
                    }),
                ) if left.path.is_ident("method") => Some(method.value()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    // Methods are case-sensitive: `"get"` is a custom method, not GET.
    let all_safe = !methods.is_empty()
        && methods
            .iter()
            .all(|method| SAFE_METHODS.contains(&method.as_str()));
    all_safe.then_some(methods)
}

/// The types through which a handler takes the store's transaction, by their last path
/// segment (however they are imported); `Option<..>` of them counts too.
const TRANSACTION_TYPES: &[&str] = &["IdempotentTransaction", "MaybeIdempotentTransaction"];

/// Whether the handler takes the store's transaction among its arguments: its key can then be
/// reserved in that transaction.
fn takes_a_transaction(signature: &syn::Signature) -> bool {
    signature.inputs.iter().any(|input| match input {
        syn::FnArg::Typed(argument) => names_a_transaction(&argument.ty),
        syn::FnArg::Receiver(_) => false,
    })
}

fn names_a_transaction(ty: &syn::Type) -> bool {
    let syn::Type::Path(path) = ty else {
        return false;
    };
    let Some(last) = path.path.segments.last() else {
        return false;
    };
    if TRANSACTION_TYPES.contains(&last.ident.to_string().as_str()) {
        return true;
    }
    let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
        return false;
    };
    last.ident == "Option"
        && arguments.args.iter().any(|argument| match argument {
            syn::GenericArgument::Type(inner) => names_a_transaction(inner),
            _ => false,
        })
}

/// The Rust expression, as text, that builds the route's policy.
fn policy_expression(marker: Marker, args: &MarkerArgs) -> String {
    let constructor = match (marker, args.optional) {
        (Marker::Idempotent, false) => "required",
        (Marker::Idempotent, true) => "optional",
        (Marker::Exempt, _) => "exempt",
        (Marker::Manual, _) => "manual",
    };
    let mut expression =
        format!("::idempotency_actix::__private::IdempotencyPolicy::{constructor}()");
    if let Some(store) = &args.store {
        expression.push_str(&format!(".store({:?})", store.value()));
    }
    expression
}
