//! Boolean expressions over record fields (`filter`) and over aggregate results (`having`).
//!
//! Grammar (keywords are case-insensitive):
//!
//! ```text
//! expr    := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | "(" expr ")" | compare
//! compare := NAME op literal | NAME ["not"] "in" "(" literal ("," literal)* ")"
//! op      := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//! literal := number | 'text' | "text" | true | false | null
//! ```
//!
//! Names are resolved to slots when the expression is parsed, so evaluation is a walk over
//! an array — no string lookups per record.
//!
//! ```
//! use tally::event::Value;
//! use tally::filter::Filter;
//! let f = Filter::parse("kind = 1 and shop in ('a', 'b')", |n| ["kind", "shop"].iter().position(|x| *x == n)).unwrap();
//! assert!(f.matches(&[Value::Int(1), Value::Str("b".into())]));
//! assert!(!f.matches(&[Value::Int(0), Value::Str("b".into())]));
//! ```

use std::cmp::Ordering;

use crate::event::Value;

/// A parsed expression whose names have been resolved to slot numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Both hold.
    And(Box<Filter>, Box<Filter>),
    /// Either holds.
    Or(Box<Filter>, Box<Filter>),
    /// Does not hold.
    Not(Box<Filter>),
    /// `slot op literal`.
    Compare {
        /// Slot of the value compared.
        slot: usize,
        /// The comparison.
        op: CompareOp,
        /// The literal compared against.
        literal: Value,
    },
    /// `slot in (literals)`.
    In {
        /// Slot of the value looked up.
        slot: usize,
        /// The accepted literals.
        set: Vec<Value>,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// Why an expression did not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterError {
    /// A name that is not a known field (or aggregate, for `having`).
    #[error("unknown name `{0}`")]
    UnknownName(String),
    /// Anything else; the message says where.
    #[error("{0}")]
    Syntax(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Number(f64, bool),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            ',' => {
                out.push(Token::Comma);
                i += 1
            }
            '\'' | '"' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&d| d == c)
                    .ok_or_else(|| FilterError::Syntax(format!("unterminated text starting at character {}", i + 1)))?;
                out.push(Token::Text(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            '=' | '!' | '<' | '>' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = match two.as_str() {
                    "==" => "=",
                    "!=" | "<>" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    _ => match c {
                        '=' => "=",
                        '<' => "<",
                        '>' => ">",
                        _ => return Err(FilterError::Syntax(format!("stray `!` at character {}", i + 1))),
                    },
                };
                i += if op.len() == 2 || two == "==" { 2 } else { 1 };
                out.push(Token::Op(op));
            }
            _ if c.is_ascii_digit() || c == '-' || c == '+' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                let n: f64 = s.parse().map_err(|_| FilterError::Syntax(format!("`{s}` is not a number")))?;
                out.push(Token::Number(n, !s.contains(['.', 'e', 'E'])));
            }
            _ if c.is_alphanumeric() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-')) {
                    i += 1;
                }
                out.push(Token::Word(chars[start..i].iter().collect()));
            }
            _ => return Err(FilterError::Syntax(format!("unexpected `{c}` at character {}", i + 1))),
        }
    }
    Ok(out)
}

struct Parser<'a, R> {
    tokens: Vec<Token>,
    pos: usize,
    resolve: &'a mut R,
}

impl<R: FnMut(&str) -> Option<usize>> Parser<'_, R> {
    fn peek_word(&self, word: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, want: Token, what: &str) -> Result<(), FilterError> {
        match self.next() {
            Some(t) if t == want => Ok(()),
            other => Err(FilterError::Syntax(format!("expected {what}, found {}", describe(&other)))),
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.tokens.get(self.pos) == Some(&Token::Open) {
            self.pos += 1;
            let inner = self.or()?;
            self.expect(Token::Close, "`)`")?;
            return Ok(inner);
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Filter, FilterError> {
        let name = match self.next() {
            Some(Token::Word(w)) => w,
            other => return Err(FilterError::Syntax(format!("expected a field name, found {}", describe(&other)))),
        };
        let slot = (self.resolve)(&name).ok_or_else(|| FilterError::UnknownName(name.clone()))?;
        let negated = self.peek_word("not");
        if negated {
            self.pos += 1;
        }
        if self.peek_word("in") {
            self.pos += 1;
            self.expect(Token::Open, "`(` after `in`")?;
            let mut set = vec![self.literal()?];
            while self.tokens.get(self.pos) == Some(&Token::Comma) {
                self.pos += 1;
                set.push(self.literal()?);
            }
            self.expect(Token::Close, "`)` closing the `in` list")?;
            let f = Filter::In { slot, set };
            return Ok(if negated { Filter::Not(Box::new(f)) } else { f });
        }
        if negated {
            return Err(FilterError::Syntax(format!("expected `in` after `{name} not`")));
        }
        let op = match self.next() {
            Some(Token::Op(o)) => match o {
                "=" => CompareOp::Eq,
                "!=" => CompareOp::Ne,
                "<" => CompareOp::Lt,
                "<=" => CompareOp::Le,
                ">" => CompareOp::Gt,
                _ => CompareOp::Ge,
            },
            other => return Err(FilterError::Syntax(format!("expected one of = != < <= > >= or `in` after `{name}`, found {}", describe(&other)))),
        };
        Ok(Filter::Compare { slot, op, literal: self.literal()? })
    }

    fn literal(&mut self) -> Result<Value, FilterError> {
        match self.next() {
            Some(Token::Number(n, true)) if n.abs() < 9.0e15 => Ok(Value::Int(n as i64)),
            Some(Token::Number(n, _)) => Ok(Value::Float(n)),
            Some(Token::Text(t)) => Ok(Value::Str(t.into())),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Ok(Value::Bool(true)),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Ok(Value::Bool(false)),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Ok(Value::Null),
            other => Err(FilterError::Syntax(format!("expected a literal (number, 'text', true, false, null), found {}", describe(&other)))),
        }
    }
}

fn describe(t: &Option<Token>) -> String {
    match t {
        None => "the end of the expression".into(),
        Some(Token::Word(w)) => format!("`{w}`"),
        Some(Token::Text(s)) => format!("'{s}'"),
        Some(Token::Number(n, _)) => format!("`{n}`"),
        Some(Token::Op(o)) => format!("`{o}`"),
        Some(Token::Open) => "`(`".into(),
        Some(Token::Close) => "`)`".into(),
        Some(Token::Comma) => "`,`".into(),
    }
}

impl Filter {
    /// Parses `text`, resolving each name to a slot with `resolve`.
    pub fn parse(text: &str, mut resolve: impl FnMut(&str) -> Option<usize>) -> Result<Filter, FilterError> {
        let mut p = Parser { tokens: tokenize(text)?, pos: 0, resolve: &mut resolve };
        let f = p.or()?;
        if p.pos < p.tokens.len() {
            return Err(FilterError::Syntax(format!("unexpected {} after a complete expression", describe(&p.tokens.get(p.pos).cloned()))));
        }
        Ok(f)
    }

    /// Evaluates the expression over the values in `slots`.
    pub fn matches(&self, slots: &[Value]) -> bool {
        match self {
            Filter::And(a, b) => a.matches(slots) && b.matches(slots),
            Filter::Or(a, b) => a.matches(slots) || b.matches(slots),
            Filter::Not(a) => !a.matches(slots),
            Filter::Compare { slot, op, literal } => {
                let Some(ord) = compare(&slots[*slot], literal) else {
                    return *op == CompareOp::Ne;
                };
                match op {
                    CompareOp::Eq => ord == Ordering::Equal,
                    CompareOp::Ne => ord != Ordering::Equal,
                    CompareOp::Lt => ord == Ordering::Less,
                    CompareOp::Le => ord != Ordering::Greater,
                    CompareOp::Gt => ord == Ordering::Greater,
                    CompareOp::Ge => ord != Ordering::Less,
                }
            }
            Filter::In { slot, set } => set.iter().any(|lit| compare(&slots[*slot], lit) == Some(Ordering::Equal)),
        }
    }
}

/// Orders a record value against a literal: numbers numerically (a numeric text counts as a
/// number, since producers are loose about quoting ids), text by bytes, and `None` for values
/// that cannot be compared (so `x = 1` is false for a missing `x`, and `x != 1` true).
fn compare(value: &Value, literal: &Value) -> Option<Ordering> {
    match (value.as_f64(), literal.as_f64()) {
        (Some(a), Some(b)) => a.partial_cmp(&b),
        _ => match (value, literal) {
            (Value::Null, Value::Null) => Some(Ordering::Equal),
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Str(a) | Value::Json(a), Value::Str(b)) => Some(a.cmp(b)),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: &str) -> Option<usize> {
        ["a", "b", "c"].iter().position(|x| *x == n)
    }

    fn eval(expr: &str, a: Value, b: Value, c: Value) -> bool {
        Filter::parse(expr, slots).unwrap().matches(&[a, b, c])
    }

    #[test]
    fn equality_membership_and_boolean_structure() {
        use Value::*;
        assert!(eval("a = 1", Int(1), Null, Null));
        assert!(eval("a == 1.0", Int(1), Null, Null));
        assert!(eval("a = '1'", Str("1".into()), Null, Null), "numeric text equals a number");
        assert!(!eval("a = 1", Null, Null, Null), "missing never equals");
        assert!(eval("a != 1", Null, Null, Null), "missing differs");
        assert!(eval("b in ('x', 'y')", Null, Str("y".into()), Null));
        assert!(eval("b not in ('x', 'y')", Null, Str("z".into()), Null));
        assert!(eval("a = 1 and (b = 'x' or c > 3)", Int(1), Str("q".into()), Float(3.5)));
        assert!(!eval("a = 1 and (b = 'x' or c > 3)", Int(1), Str("q".into()), Int(3)));
        assert!(eval("not a = 2 AND c >= 3", Int(1), Null, Int(3)), "not binds tighter than and");
        assert!(eval("a < -1.5", Float(-2.0), Null, Null));
        assert!(eval("b = true", Null, Bool(true), Null));
    }

    #[test]
    fn errors_say_what_was_wrong() {
        assert_eq!(Filter::parse("zz = 1", slots), Err(FilterError::UnknownName("zz".into())));
        for bad in ["a =", "a 1", "(a = 1", "a = 1 b = 2", "a in 1", "a = 'x", "a ! 1"] {
            assert!(matches!(Filter::parse(bad, slots), Err(FilterError::Syntax(_))), "{bad}");
        }
    }
}
