//! Recursive-descent parser for mask expressions.
//!
//! ```text
//! or    := and ('|' and)*          (left-associative)
//! and   := unary ('&' unary)*      (left-associative)
//! unary := '!' unary | primary
//! primary := '(' or ')' | atom
//! atom  := name [ '(' number (',' number)* ')' ]
//! ```
//! Whitespace is allowed between any two tokens. Every error names the byte position of the
//! mistake and shows a caret under it ([`Error::MaskParse`]).
use super::expr::MaskExpr;
use crate::error::{Error, Result};

/// Deepest expression tree accepted (keeps recursion in parse, print, bind and drop bounded).
pub const MAX_DEPTH: usize = 200;

/// The atoms, as listed in error messages.
pub const ATOMS: &str =
    "full, causal, window(L,R), sinks(S), prefix(P), chunk(C), strided(S), document, power(B), \
radial(F,W), neighborhood(K[,D]), neighborhood2d(H,W,KH,KW[,DH,DW]), neighborhood3d(T,H,W,KT,KH,KW[,DT,DH,DW])";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok<'a> {
    Ident(&'a str),
    Num(&'a str),
    LParen,
    RParen,
    Comma,
    Not,
    And,
    Or,
    End,
}

impl Tok<'_> {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Num(s) => format!("number `{s}`"),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Not => "`!`".into(),
            Tok::And => "`&`".into(),
            Tok::Or => "`|`".into(),
            Tok::End => "end of input".into(),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    /// Current token and its byte position.
    tok: Tok<'a>,
    tok_pos: usize,
}

/// Builds the error with a caret line under byte `pos` of `text`.
pub(crate) fn parse_error(text: &str, pos: usize, msg: impl Into<String>) -> Error {
    // Show control characters as spaces so the caret lines up.
    let shown: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let pos = pos.min(text.len());
    let col = text.char_indices().take_while(|&(b, _)| b < pos).count();
    Error::MaskParse {
        pos,
        msg: msg.into(),
        expr: shown,
        caret: format!("{}^", " ".repeat(col)),
    }
}

impl<'a> Parser<'a> {
    fn err(&self, pos: usize, msg: impl Into<String>) -> Error {
        parse_error(self.text, pos, msg)
    }

    /// Reads the next token into `self.tok`.
    fn bump(&mut self) -> Result<()> {
        let rest = &self.text[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        self.tok_pos = self.pos;
        let Some(c) = trimmed.chars().next() else {
            self.tok = Tok::End;
            return Ok(());
        };
        let take = |pred: fn(char) -> bool| -> usize {
            trimmed
                .char_indices()
                .find(|&(_, c)| !pred(c))
                .map_or(trimmed.len(), |(b, _)| b)
        };
        let (tok, len) = match c {
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '!' => (Tok::Not, 1),
            '&' => (Tok::And, 1),
            '|' => (Tok::Or, 1),
            c if c.is_ascii_digit() => {
                let n = take(|c| c.is_ascii_alphanumeric() || c == '_');
                (Tok::Num(&trimmed[..n]), n)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let n = take(|c| c.is_ascii_alphanumeric() || c == '_');
                (Tok::Ident(&trimmed[..n]), n)
            }
            c => {
                return Err(self.err(self.pos, format!("unexpected character `{c}`")));
            }
        };
        self.tok = tok;
        self.pos += len;
        Ok(())
    }

    /// `or := and ('|' and)*`; returns the tree and its depth.
    fn or(&mut self, depth: usize) -> Result<(MaskExpr, usize)> {
        let (mut e, mut d) = self.and(depth)?;
        while self.tok == Tok::Or {
            let at = self.tok_pos;
            self.bump()?;
            let (r, dr) = self.and(depth)?;
            d = d.max(dr) + 1;
            self.check_depth(d, at)?;
            e = MaskExpr::Or(Box::new(e), Box::new(r));
        }
        Ok((e, d))
    }

    fn and(&mut self, depth: usize) -> Result<(MaskExpr, usize)> {
        let (mut e, mut d) = self.unary(depth)?;
        while self.tok == Tok::And {
            let at = self.tok_pos;
            self.bump()?;
            let (r, dr) = self.unary(depth)?;
            d = d.max(dr) + 1;
            self.check_depth(d, at)?;
            e = MaskExpr::And(Box::new(e), Box::new(r));
        }
        Ok((e, d))
    }

    fn check_depth(&self, d: usize, at: usize) -> Result<()> {
        if d > MAX_DEPTH {
            return Err(self.err(
                at,
                format!("expression nested too deeply (more than {MAX_DEPTH} levels)"),
            ));
        }
        Ok(())
    }

    fn unary(&mut self, depth: usize) -> Result<(MaskExpr, usize)> {
        self.check_depth(depth, self.tok_pos)?;
        match self.tok {
            Tok::Not => {
                self.bump()?;
                let (e, d) = self.unary(depth + 1)?;
                Ok((MaskExpr::Not(Box::new(e)), d + 1))
            }
            Tok::LParen => {
                let open = self.tok_pos;
                self.bump()?;
                if self.tok == Tok::RParen {
                    return Err(self.err(self.tok_pos, "empty parentheses"));
                }
                let (e, d) = self.or(depth + 1)?;
                if self.tok != Tok::RParen {
                    return Err(self.err(
                        self.tok_pos,
                        format!(
                            "unbalanced parentheses: `(` at position {open} is not closed (found {})",
                            self.tok.describe()
                        ),
                    ));
                }
                self.bump()?;
                Ok((e, d))
            }
            Tok::Ident(name) => {
                let at = self.tok_pos;
                self.bump()?;
                Ok((self.atom(name, at)?, 1))
            }
            Tok::End if self.tok_pos == 0 || self.text.trim().is_empty() => {
                Err(self.err(self.tok_pos, "empty expression"))
            }
            other => Err(self.err(
                self.tok_pos,
                format!(
                    "expected an atom, `!` or `(`, found {} (atoms: {ATOMS})",
                    other.describe()
                ),
            )),
        }
    }

    /// Reads `'(' number (',' number)* ')'` if present; returns the numbers and their positions.
    fn args(&mut self) -> Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        if self.tok != Tok::LParen {
            return Ok(out);
        }
        self.bump()?;
        if self.tok == Tok::RParen {
            // `name()`: an empty list, reported as a wrong argument count by the caller.
            self.bump()?;
            return Ok(out);
        }
        loop {
            match self.tok {
                Tok::Num(s) => {
                    let v = s.parse::<usize>().map_err(|_| {
                        let why = if s.bytes().all(|b| b.is_ascii_digit()) {
                            "is too large"
                        } else {
                            "is not a non-negative integer"
                        };
                        self.err(self.tok_pos, format!("bad number `{s}`: {why}"))
                    })?;
                    out.push((v, self.tok_pos));
                    self.bump()?;
                }
                other => {
                    return Err(self.err(
                        self.tok_pos,
                        format!(
                            "bad number: expected a non-negative integer argument, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
            match self.tok {
                Tok::Comma => self.bump()?,
                Tok::RParen => {
                    self.bump()?;
                    return Ok(out);
                }
                other => {
                    return Err(self.err(
                        self.tok_pos,
                        format!(
                            "expected `,` or `)` in the argument list, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
        }
    }

    fn atom(&mut self, name: &str, at: usize) -> Result<MaskExpr> {
        let had_parens = self.tok == Tok::LParen;
        let args = self.args()?;
        let (min, max, sig): (usize, usize, &str) = match name {
            "full" | "causal" | "document" => (0, 0, ""),
            "window" => (2, 2, "(L,R)"),
            "sinks" => (1, 1, "(S)"),
            "prefix" => (1, 1, "(P)"),
            "chunk" => (1, 1, "(C)"),
            "strided" => (1, 1, "(S)"),
            "power" => (1, 1, "(B)"),
            "radial" => (2, 2, "(F,W)"),
            "neighborhood" => (1, 2, "(K[,D])"),
            "neighborhood2d" => (4, 6, "(H,W,KH,KW[,DH,DW])"),
            "neighborhood3d" => (6, 9, "(T,H,W,KT,KH,KW[,DT,DH,DW])"),
            _ => return Err(self.err(at, format!("unknown atom `{name}`; known atoms: {ATOMS}"))),
        };
        let n = args.len();
        let count_ok = match name {
            "neighborhood2d" => n == 4 || n == 6,
            "neighborhood3d" => n == 6 || n == 9,
            _ => (min..=max).contains(&n),
        };
        if !count_ok || (max == 0 && had_parens) {
            let want = if max == 0 {
                format!("`{name}` takes no arguments")
            } else {
                format!("`{name}{sig}` takes {}", plural(min, max, name))
            };
            return Err(self.err(at, format!("wrong number of arguments: {want}, got {n}")));
        }
        // Arguments that must be >= 1 (a zero would make no sense).
        let positive: &[usize] = match name {
            "chunk" | "strided" | "power" | "radial" => &[0],
            "neighborhood" => &[0, 1],
            "neighborhood2d" | "neighborhood3d" => &[0, 1, 2, 3, 4, 5, 6, 7, 8],
            _ => &[],
        };
        for &k in positive {
            if let Some(&(0, pos)) = args.get(k) {
                return Err(self.err(pos, format!("bad number: `{name}` arguments must be >= 1")));
            }
        }
        let v: Vec<usize> = args.iter().map(|a| a.0).collect();
        Ok(match name {
            "full" => MaskExpr::Full,
            "causal" => MaskExpr::Causal,
            "document" => MaskExpr::Document,
            "window" => MaskExpr::Window {
                left: v[0],
                right: v[1],
            },
            "sinks" => MaskExpr::Sinks(v[0]),
            "prefix" => MaskExpr::Prefix(v[0]),
            "chunk" => MaskExpr::Chunk(v[0]),
            "strided" => MaskExpr::Strided(v[0]),
            "power" => MaskExpr::Power(v[0]),
            "radial" => MaskExpr::Radial {
                frame: v[0],
                window: v[1],
            },
            "neighborhood" => MaskExpr::Neighborhood {
                grid: vec![],
                kernel: vec![v[0]],
                dilation: vec![v.get(1).copied().unwrap_or(1)],
            },
            _ => {
                let axes = if name == "neighborhood2d" { 2 } else { 3 };
                MaskExpr::Neighborhood {
                    grid: v[..axes].to_vec(),
                    kernel: v[axes..2 * axes].to_vec(),
                    dilation: if n == 3 * axes {
                        v[2 * axes..].to_vec()
                    } else {
                        vec![1; axes]
                    },
                }
            }
        })
    }
}

fn plural(min: usize, max: usize, name: &str) -> String {
    match name {
        "neighborhood2d" => "4 or 6 arguments".into(),
        "neighborhood3d" => "6 or 9 arguments".into(),
        _ if min == max => format!("{min} argument{}", if min == 1 { "" } else { "s" }),
        _ => format!("{min} to {max} arguments"),
    }
}

impl MaskExpr {
    /// Parses a mask expression such as `causal & (sinks(4) | window(1024,0))`.
    /// Precedence: `!` > `&` > `|`; `&` and `|` are left-associative.
    pub fn parse(text: &str) -> Result<MaskExpr> {
        let mut p = Parser {
            text,
            pos: 0,
            tok: Tok::End,
            tok_pos: 0,
        };
        p.bump()?;
        if p.tok == Tok::End {
            return Err(p.err(p.tok_pos, "empty expression"));
        }
        let (e, _) = p.or(1)?;
        match p.tok {
            Tok::End => Ok(e),
            Tok::RParen => Err(p.err(
                p.tok_pos,
                "unbalanced parentheses: `)` without a matching `(`",
            )),
            other => Err(p.err(
                p.tok_pos,
                format!(
                    "trailing input: expected `&`, `|` or end of input, found {}",
                    other.describe()
                ),
            )),
        }
    }
}
