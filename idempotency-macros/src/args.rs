//! Parsing of the attributes' own arguments.

use proc_macro2::TokenStream;
use syn::{parse::Parser, punctuated::Punctuated, Expr, Lit, LitStr, Meta, Token};

use crate::expand::Marker;

/// The arguments of one attribute.
#[derive(Debug, Default)]
pub(crate) struct MarkerArgs {
    pub(crate) optional: bool,
    pub(crate) store: Option<LitStr>,
}

pub(crate) fn parse(marker: Marker, args: TokenStream) -> syn::Result<MarkerArgs> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    let mut parsed = MarkerArgs::default();
    for meta in metas {
        match &meta {
            Meta::Path(path) if path.is_ident("optional") && marker == Marker::Idempotent => {
                if parsed.optional {
                    return Err(syn::Error::new_spanned(path, "`optional` is given twice"));
                }
                parsed.optional = true;
            }
            Meta::NameValue(pair) if pair.path.is_ident("store") && marker != Marker::Exempt => {
                if parsed.store.is_some() {
                    return Err(syn::Error::new_spanned(
                        &pair.path,
                        "`store` is given twice",
                    ));
                }
                match &pair.value {
                    Expr::Lit(expr) if matches!(&expr.lit, Lit::Str(_)) => {
                        if let Lit::Str(name) = &expr.lit {
                            parsed.store = Some(name.clone());
                        }
                    }
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`store` takes a string literal: `store = \"name\"`",
                        ))
                    }
                }
            }
            _ => return Err(syn::Error::new_spanned(meta, unknown_argument(marker))),
        }
    }
    Ok(parsed)
}

fn unknown_argument(marker: Marker) -> String {
    match marker {
        Marker::Idempotent => {
            "unknown argument; `#[idempotent]` accepts `optional` and `store = \"name\"`".to_owned()
        }
        Marker::Exempt => "`#[idempotency_exempt]` takes no arguments".to_owned(),
        Marker::Manual => {
            "unknown argument; `#[idempotency_manual]` accepts `store = \"name\"`".to_owned()
        }
    }
}
