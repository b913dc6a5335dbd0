//! Filter and `having` expressions, parsed and evaluated by the README's rules: numbers
//! compare as numbers (numeric text counts as a number), text by bytes, and a missing value
//! equals nothing (so `x = 1` is false and `x != 1` true when `x` is missing).

use std::cmp::Ordering;

use super::value::Val;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(String, &'static str, Val),
    In(String, Vec<Val>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Lit(Val),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '(' || ch == ')' || ch == ',' {
            out.push(match ch {
                '(' => Tok::Open,
                ')' => Tok::Close,
                _ => Tok::Comma,
            });
            i += 1;
        } else if ch == '\'' || ch == '"' {
            let end = c[i + 1..].iter().position(|&x| x == ch).ok_or("unterminated text")? + i + 1;
            out.push(Tok::Lit(Val::Str(c[i + 1..end].iter().collect())));
            i = end + 1;
        } else if "=!<>".contains(ch) {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let (op, len) = match two.as_str() {
                "==" => ("=", 2),
                "!=" | "<>" => ("!=", 2),
                "<=" => ("<=", 2),
                ">=" => (">=", 2),
                _ if ch == '=' => ("=", 1),
                _ if ch == '<' => ("<", 1),
                _ if ch == '>' => (">", 1),
                _ => return Err(format!("bad operator at {i}")),
            };
            out.push(Tok::Op(op));
            i += len;
        } else if ch.is_ascii_digit() || (ch == '-' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            i += 1;
            while i < c.len() && (c[i].is_ascii_digit() || c[i] == '.') {
                i += 1;
            }
            let t: String = c[start..i].iter().collect();
            let n: f64 = t.parse().map_err(|_| format!("bad number {t}"))?;
            let integral = !t.contains('.');
            out.push(Tok::Lit(if integral && n.abs() < 9.0e15 { Val::Int(n as i64) } else { Val::Float(n) }));
        } else {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || matches!(c[i], '_' | '.' | '-')) {
                i += 1;
            }
            if i == start {
                return Err(format!("unexpected {ch}"));
            }
            let w: String = c[start..i].iter().collect();
            out.push(match w.to_ascii_lowercase().as_str() {
                "true" => Tok::Lit(Val::Bool(true)),
                "false" => Tok::Lit(Val::Bool(false)),
                "null" => Tok::Lit(Val::Null),
                _ => Tok::Word(w),
            });
        }
    }
    Ok(out)
}

struct P {
    t: Vec<Tok>,
    i: usize,
}

impl P {
    fn kw(&self, k: &str) -> bool {
        matches!(self.t.get(self.i), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(k))
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.kw("or") {
            self.i += 1;
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while self.kw("and") {
            self.i += 1;
            l = Expr::And(Box::new(l), Box::new(self.unary()?));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.kw("not") {
            self.i += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.t.get(self.i) == Some(&Tok::Open) {
            self.i += 1;
            let e = self.or()?;
            if self.t.get(self.i) != Some(&Tok::Close) {
                return Err("missing )".into());
            }
            self.i += 1;
            return Ok(e);
        }
        let Some(Tok::Word(name)) = self.t.get(self.i).cloned() else { return Err("expected a name".into()) };
        self.i += 1;
        let negated = self.kw("not");
        if negated {
            self.i += 1;
        }
        if self.kw("in") {
            self.i += 1;
            self.i += 1; // (
            let mut set = Vec::new();
            while let Some(Tok::Lit(v)) = self.t.get(self.i).cloned() {
                set.push(v);
                self.i += 1;
                if self.t.get(self.i) == Some(&Tok::Comma) {
                    self.i += 1;
                }
            }
            self.i += 1; // )
            let e = Expr::In(name, set);
            return Ok(if negated { Expr::Not(Box::new(e)) } else { e });
        }
        let Some(Tok::Op(op)) = self.t.get(self.i).cloned() else { return Err("expected an operator".into()) };
        self.i += 1;
        let Some(Tok::Lit(v)) = self.t.get(self.i).cloned() else { return Err("expected a literal".into()) };
        self.i += 1;
        Ok(Expr::Cmp(name, op, v))
    }
}

/// Orders a value against a literal; `None` when they do not compare.
fn order(v: &Val, lit: &Val) -> Option<Ordering> {
    match (v.number(), lit.number()) {
        (Some(a), Some(b)) => a.partial_cmp(&b),
        _ => match (v, lit) {
            (Val::Null, Val::Null) => Some(Ordering::Equal),
            (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
            (Val::Str(a) | Val::Json(a), Val::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            _ => None,
        },
    }
}

impl Expr {
    pub fn parse(text: &str) -> Result<Expr, String> {
        let mut p = P { t: lex(text)?, i: 0 };
        let e = p.or()?;
        if p.i != p.t.len() {
            return Err("trailing tokens".into());
        }
        Ok(e)
    }

    /// The names it reads.
    pub fn names(&self) -> Vec<String> {
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => [a.names(), b.names()].concat(),
            Expr::Not(a) => a.names(),
            Expr::Cmp(n, _, _) | Expr::In(n, _) => vec![n.clone()],
        }
    }

    pub fn eval(&self, get: &dyn Fn(&str) -> Val) -> bool {
        match self {
            Expr::And(a, b) => a.eval(get) && b.eval(get),
            Expr::Or(a, b) => a.eval(get) || b.eval(get),
            Expr::Not(a) => !a.eval(get),
            Expr::Cmp(n, op, lit) => match order(&get(n), lit) {
                None => *op == "!=",
                Some(o) => match *op {
                    "=" => o == Ordering::Equal,
                    "!=" => o != Ordering::Equal,
                    "<" => o == Ordering::Less,
                    "<=" => o != Ordering::Greater,
                    ">" => o == Ordering::Greater,
                    _ => o != Ordering::Less,
                },
            },
            Expr::In(n, set) => {
                let v = get(n);
                set.iter().any(|l| order(&v, l) == Some(Ordering::Equal))
            }
        }
    }
}
