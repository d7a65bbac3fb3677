//! C-like type names, built as C declarators: the type is walked from the outside in while the
//! declarator text (`*`, `[16]`, `(...)`) accumulates around an empty name.

use crate::{Btf, Error, TypeId, TypeInfo, MAX_DEPTH, MAX_NAME_STEPS};

struct Namer<'a> {
    btf: &'a Btf,
    root: TypeId,
    steps: usize,
}

pub(crate) fn type_name(btf: &Btf, id: TypeId) -> Result<String, Error> {
    Namer {
        btf,
        root: id,
        steps: 0,
    }
    .decl(id, String::new(), 0)
}

fn join(base: &str, inner: &str) -> String {
    if inner.is_empty() {
        base.to_owned()
    } else {
        format!("{base} {inner}")
    }
}

/// Arrays and functions bind tighter than `*`, so a pointer declarator around them needs
/// parentheses: `char (*)[16]`, `int (*)(void)`.
fn wrap(inner: &str) -> String {
    if inner.starts_with('*') {
        format!("({inner})")
    } else {
        inner.to_owned()
    }
}

impl Namer<'_> {
    fn decl(&mut self, id: TypeId, inner: String, depth: usize) -> Result<String, Error> {
        self.steps += 1;
        if self.steps > MAX_NAME_STEPS {
            return Err(Error::TooComplex {
                id: self.root,
                limit: MAX_NAME_STEPS,
            });
        }
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep {
                id: self.root,
                limit: MAX_DEPTH,
            });
        }
        let t = self.btf.get(id)?;
        let named = |prefix: &str| {
            if t.name.is_empty() {
                format!("{prefix} {{...}}")
            } else {
                format!("{prefix} {}", t.name)
            }
        };
        Ok(match t.info {
            TypeInfo::Void => join("void", &inner),
            TypeInfo::Int(_) | TypeInfo::Float { .. } | TypeInfo::Typedef { .. } => {
                join(t.name, &inner)
            }
            TypeInfo::Struct { .. } => join(&named("struct"), &inner),
            TypeInfo::Union { .. } => join(&named("union"), &inner),
            TypeInfo::Enum { .. } | TypeInfo::Enum64 { .. } => join(&named("enum"), &inner),
            TypeInfo::Fwd { is_union } => {
                join(&named(if is_union { "union" } else { "struct" }), &inner)
            }
            TypeInfo::Datasec { .. } => join(&format!("SEC({})", t.name), &inner),
            TypeInfo::Ptr { target } => self.decl(target, format!("*{inner}"), depth + 1)?,
            TypeInfo::Array { element, count, .. } => {
                self.decl(element, format!("{}[{count}]", wrap(&inner)), depth + 1)?
            }
            TypeInfo::Const { target } => self.qualified("const", target, inner, depth)?,
            TypeInfo::Volatile { target } => self.qualified("volatile", target, inner, depth)?,
            TypeInfo::Restrict { target } => self.qualified("restrict", target, inner, depth)?,
            TypeInfo::TypeTag { target }
            | TypeInfo::DeclTag { target, .. }
            | TypeInfo::Var { target, .. } => self.decl(target, inner, depth + 1)?,
            TypeInfo::Func { proto, .. } => {
                self.decl(proto, format!("{}{inner}", t.name), depth + 1)?
            }
            TypeInfo::FuncProto { ret, .. } => {
                let mut params = Vec::new();
                let list: Vec<_> = self.btf.params(id)?.collect();
                let last = list.len().saturating_sub(1);
                for (i, p) in list.iter().enumerate() {
                    if i == last && p.type_id == TypeId::VOID && p.name.is_empty() {
                        params.push("...".to_owned());
                    } else {
                        params.push(self.decl(p.type_id, String::new(), depth + 1)?);
                    }
                }
                let params = if params.is_empty() {
                    "void".to_owned()
                } else {
                    params.join(", ")
                };
                self.decl(ret, format!("{}({params})", wrap(&inner)), depth + 1)?
            }
        })
    }

    /// C writes a qualifier of a pointer after the `*` (`char *const`) and a qualifier of
    /// anything else before the type (`const char *`).
    fn qualified(
        &mut self,
        qualifier: &str,
        target: TypeId,
        inner: String,
        depth: usize,
    ) -> Result<String, Error> {
        if self.qualifies_pointer(target)? {
            self.decl(target, join(qualifier, &inner), depth + 1)
        } else {
            Ok(format!(
                "{qualifier} {}",
                self.decl(target, inner, depth + 1)?
            ))
        }
    }

    /// Whether a qualifier applies to a pointer, looking through further qualifiers and type
    /// tags (`restrict` of `__rcu` of `struct x *`).
    fn qualifies_pointer(&self, mut id: TypeId) -> Result<bool, Error> {
        for _ in 0..=MAX_DEPTH {
            match self.btf.info(id)? {
                TypeInfo::Ptr { .. } => return Ok(true),
                TypeInfo::Const { target }
                | TypeInfo::Volatile { target }
                | TypeInfo::Restrict { target }
                | TypeInfo::TypeTag { target } => id = target,
                _ => return Ok(false),
            }
        }
        Err(Error::TooDeep {
            id: self.root,
            limit: MAX_DEPTH,
        })
    }
}
