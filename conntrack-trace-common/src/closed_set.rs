//! Closed sets of names (reason codes, modes, hooks…) as enums whose spelling in JSON, text
//! and metrics is written once, beside the variant: a misspelt name does not compile.

/// An enum of unit variants, each with its one spelling: `Variant = "spelling"`. Gives
/// `as_str`, `doc` (the variant's doc comment), `ALL` in declaration order, `Display`, and
/// `Ord` by declaration order.
#[macro_export]
macro_rules! closed_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[doc = $doc])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name in JSON, text and metrics.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// What the value means (its doc comment).
            pub const fn doc(self) -> &'static str {
                match self {
                    $($name::$variant => concat!($($doc),*)),+
                }
            }
        }

        /// The name, padded to any width asked for (`{:<16}`).
        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

/// Serialises a [`closed_set!`] enum as its name, and describes it in JSON Schema as one of
/// its names, each with its doc comment. Needs this crate's `user` feature.
#[macro_export]
macro_rules! string_schema {
    ($name:ident) => {
        impl $crate::__private::serde::Serialize for $name {
            fn serialize<S: $crate::__private::serde::Serializer>(
                &self,
                s: S,
            ) -> ::core::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl $crate::__private::schemars::JsonSchema for $name {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(
                _: &mut $crate::__private::schemars::SchemaGenerator,
            ) -> $crate::__private::schemars::Schema {
                use $crate::__private::serde_json::{Value, json};
                let one_of: ::std::vec::Vec<Value> = Self::ALL
                    .iter()
                    .map(|v| json!({"const": v.as_str(), "description": v.doc().trim()}))
                    .collect();
                let mut s = $crate::__private::schemars::Schema::default();
                s.insert("type".into(), "string".into());
                s.insert("oneOf".into(), Value::Array(one_of));
                s
            }
        }
    };
}
