//! Metadata filters in the MongoDB / Pinecone / Chroma convention, compiled to SQLite SQL with bound
//! parameters.
//!
//! A filter is a JSON object. Each key is either a logical operator or a field:
//!
//! * `{"lang": "rust"}` — implicit `$eq`; `{"year": {"$gte": 2020, "$lt": 2024}}` — several operators on one
//!   field must all hold; several keys in one object must all hold.
//! * field operators: `$eq $ne $gt $gte $lt $lte $in $nin $exists`, and `$not` over an operator object
//!   (`{"year": {"$not": {"$gt": 2020}}}`).
//! * logical operators: `$and` / `$or` take a non-empty list of filters, `$not` one filter object.
//! * dotted keys address nested objects: `"source.site"` is `metadata.source.site`. A key segment may hold
//!   any character except `"`, `\` and control characters; a literal dot in a stored key cannot be addressed.
//!
//! Type semantics (as MongoDB's, for the types JSON has):
//!
//! * numbers compare with numbers (integers and reals alike, numerically), strings with strings (by UTF-8
//!   bytes, i.e. code point order), booleans only with booleans under `$eq`/`$ne`/`$in`/`$nin`. Comparing a
//!   number with a string (or a boolean with a number) never matches — `{"year": {"$gt": "2020"}}` does not
//!   match `"year": 2021`. Range operators (`$gt` …) accept numbers and strings only.
//! * when the stored value is an array, a condition holds when it holds for at least one element
//!   (`{"tags": "rust"}` matches `"tags": ["db", "rust"]`); arrays and objects are never compared whole.
//! * `$eq: null` (and `null` in `$in`) matches a JSON `null`, a missing field, or an array holding `null`.
//! * `$ne` and `$nin` are the negations of `$eq` and `$in`, so they match documents where the field is
//!   missing (and documents without metadata); so does `$not`.
//! * `$exists: true` matches any present value, `null` included; `$exists: false` only missing fields.
//!
//! Limits: filters nest at most [`MAX_DEPTH`] levels; `$and`, `$or`, `$in` and `$nin` lists hold at most
//! [`MAX_LIST`] entries; a whole filter binds at most [`MAX_PARAMS`] values. Errors name the position in the filter as a JSON pointer
//! (`/$and/1/year/$gtx: unknown operator "$gtx"`).
//!
//! Nothing in a filter becomes SQL text: every value and every JSON path (built from the validated key
//! segments, each quoted) is a bound parameter.

use std::str::FromStr;

use rusqlite::types::Value as SqlValue;
use serde_json::{Map, Value};

/// Deepest nesting of filter objects and operator objects.
pub const MAX_DEPTH: usize = 32;
/// Most entries in a `$and`, `$or`, `$in` or `$nin` list.
pub const MAX_LIST: usize = 1024;
/// Longest field key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most bound values (values and paths) in a whole filter; SQLite allows 32,766 per statement.
pub const MAX_PARAMS: usize = 30_000;

/// A malformed filter: where (a JSON pointer into the filter) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", if pointer.is_empty() { "<root>" } else { pointer.as_str() })]
pub struct FilterError {
    /// JSON pointer (RFC 6901) of the offending value; empty for the whole filter.
    pub pointer: String,
    /// What was expected and what was found.
    pub message: String,
}

/// A parsed, validated metadata filter. Build it with [`Filter::parse`] or `str::parse`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    root: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Field { json_path: String, cond: Cond },
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Eq(Scalar),
    Ne(Scalar),
    Cmp(CmpOp, Scalar),
    In(Vec<Scalar>),
    Nin(Vec<Scalar>),
    Exists(bool),
    Not(Box<Cond>),
    All(Vec<Cond>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Gte => ">=",
            CmpOp::Lt => "<",
            CmpOp::Lte => "<=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Real(f64),
    Text(String),
}

impl Filter {
    /// The filter that matches every document (`{}`).
    pub fn all() -> Filter {
        Filter {
            root: Node::And(Vec::new()),
        }
    }

    /// Parses and validates a filter given as a JSON value.
    pub fn parse(value: &Value) -> Result<Filter, FilterError> {
        let mut at = Pointer::default();
        let filter = Filter {
            root: parse_filter(value, &mut at, 1)?,
        };
        let (mut sql, mut params) = (String::new(), Vec::new());
        filter.to_sql("metadata", &mut sql, &mut params);
        if params.len() > MAX_PARAMS {
            return Err(at.err(format!(
                "filter is too large: it needs {} values and paths; at most {MAX_PARAMS} are allowed",
                params.len()
            )));
        }
        Ok(filter)
    }

    /// Appends the SQL boolean expression of this filter over the metadata column `column` to `sql`, and
    /// its parameters (in order, for `?` placeholders) to `params`. `column` is chosen by this crate, never
    /// by a user.
    pub(crate) fn to_sql(
        &self,
        column: &'static str,
        sql: &mut String,
        params: &mut Vec<SqlValue>,
    ) {
        node_sql(&self.root, column, sql, params);
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    /// Parses a filter from JSON text.
    fn from_str(s: &str) -> Result<Filter, FilterError> {
        let value: Value = serde_json::from_str(s).map_err(|e| FilterError {
            pointer: String::new(),
            message: format!("not valid JSON: {e}"),
        })?;
        Filter::parse(&value)
    }
}

impl TryFrom<&Value> for Filter {
    type Error = FilterError;

    fn try_from(value: &Value) -> Result<Filter, FilterError> {
        Filter::parse(value)
    }
}

/// The JSON pointer of the value being parsed.
#[derive(Default)]
struct Pointer(Vec<String>);

impl Pointer {
    fn push(&mut self, segment: impl Into<String>) {
        self.0.push(segment.into());
    }
    fn pop(&mut self) {
        self.0.pop();
    }
    fn err(&self, message: impl Into<String>) -> FilterError {
        let mut pointer = String::new();
        for segment in &self.0 {
            pointer.push('/');
            pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
        }
        FilterError {
            pointer,
            message: message.into(),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_depth(at: &Pointer, depth: usize) -> Result<(), FilterError> {
    if depth > MAX_DEPTH {
        Err(at.err(format!("filter nests deeper than {MAX_DEPTH} levels")))
    } else {
        Ok(())
    }
}

fn parse_filter(value: &Value, at: &mut Pointer, depth: usize) -> Result<Node, FilterError> {
    check_depth(at, depth)?;
    let Value::Object(map) = value else {
        return Err(at.err(format!(
            "expected a filter object, got {}",
            type_name(value)
        )));
    };
    let mut parts = Vec::with_capacity(map.len());
    for (key, v) in map {
        at.push(key.as_str());
        let node = match key.as_str() {
            "$and" | "$or" => {
                let list = parse_list(v, at)?;
                if list.is_empty() {
                    return Err(at.err(format!("{key} needs at least one filter")));
                }
                let mut nodes = Vec::with_capacity(list.len());
                for (i, item) in list.iter().enumerate() {
                    at.push(i.to_string());
                    nodes.push(parse_filter(item, at, depth + 1)?);
                    at.pop();
                }
                if key == "$and" {
                    Node::And(nodes)
                } else {
                    Node::Or(nodes)
                }
            }
            "$not" => Node::Not(Box::new(parse_filter(v, at, depth + 1)?)),
            k if k.starts_with('$') => {
                return Err(at.err(format!(
                    "unknown operator {k:?} (logical operators: $and, $or, $not; field keys cannot start with '$')"
                )))
            }
            k => Node::Field {
                json_path: json_path(k, at)?,
                cond: parse_cond(v, at, depth + 1)?,
            },
        };
        at.pop();
        parts.push(node);
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Node::And(parts)
    })
}

fn parse_list<'v>(value: &'v Value, at: &Pointer) -> Result<&'v Vec<Value>, FilterError> {
    let Value::Array(list) = value else {
        return Err(at.err(format!("expected a list, got {}", type_name(value))));
    };
    if list.len() > MAX_LIST {
        return Err(at.err(format!(
            "list has {} entries; at most {MAX_LIST} are allowed",
            list.len()
        )));
    }
    Ok(list)
}

/// Validates a (dotted) field key and builds its SQLite JSON path, every segment quoted: `$."a"."b c"`.
fn json_path(key: &str, at: &Pointer) -> Result<String, FilterError> {
    if key.len() > MAX_KEY_LEN {
        return Err(at.err(format!(
            "field key is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            key.len()
        )));
    }
    let mut path = String::with_capacity(key.len() + 8);
    path.push('$');
    for segment in key.split('.') {
        if segment.is_empty() {
            return Err(at.err(format!(
                "field key {key:?} has an empty segment (keys are dot-separated names)"
            )));
        }
        if let Some(c) = segment
            .chars()
            .find(|&c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(at.err(format!(
                "field key {key:?} contains {c:?}, which cannot be used in a field key"
            )));
        }
        path.push_str(".\"");
        path.push_str(segment);
        path.push('"');
    }
    Ok(path)
}

fn parse_cond(value: &Value, at: &mut Pointer, depth: usize) -> Result<Cond, FilterError> {
    check_depth(at, depth)?;
    let map: &Map<String, Value> = match value {
        Value::Object(map) => map,
        Value::Array(_) => {
            return Err(at.err(
                "an array cannot be compared with a field; use {\"$in\": [...]} to match any of several values",
            ))
        }
        scalar => return Ok(Cond::Eq(parse_scalar(scalar, at)?)),
    };
    if map.is_empty() {
        return Err(
            at.err("empty operator object; expected a value or operators such as {\"$eq\": ...}")
        );
    }
    if !map.keys().any(|k| k.starts_with('$')) {
        return Err(at.err(
            "an object cannot be compared with a field; address nested fields with dotted keys (\"a.b\")",
        ));
    }
    let mut conds = Vec::with_capacity(map.len());
    for (op, arg) in map {
        at.push(op.as_str());
        let cond = match op.as_str() {
            "$eq" => Cond::Eq(parse_scalar(arg, at)?),
            "$ne" => Cond::Ne(parse_scalar(arg, at)?),
            "$gt" => Cond::Cmp(CmpOp::Gt, parse_ordered(arg, at)?),
            "$gte" => Cond::Cmp(CmpOp::Gte, parse_ordered(arg, at)?),
            "$lt" => Cond::Cmp(CmpOp::Lt, parse_ordered(arg, at)?),
            "$lte" => Cond::Cmp(CmpOp::Lte, parse_ordered(arg, at)?),
            "$in" | "$nin" => {
                let list = parse_list(arg, at)?;
                let mut values = Vec::with_capacity(list.len());
                for (i, item) in list.iter().enumerate() {
                    at.push(i.to_string());
                    values.push(parse_scalar(item, at)?);
                    at.pop();
                }
                if op == "$in" {
                    Cond::In(values)
                } else {
                    Cond::Nin(values)
                }
            }
            "$exists" => match arg {
                Value::Bool(b) => Cond::Exists(*b),
                other => {
                    return Err(at.err(format!("expected true or false, got {}", type_name(other))))
                }
            },
            "$not" => match arg {
                Value::Object(_) => Cond::Not(Box::new(parse_cond(arg, at, depth + 1)?)),
                other => {
                    return Err(at.err(format!(
                        "expected an operator object such as {{\"$gt\": 1}}, got {}",
                        type_name(other)
                    )))
                }
            },
            k if k.starts_with('$') => return Err(at.err(format!("unknown operator {k:?}"))),
            k => {
                return Err(at.err(format!(
                    "expected an operator, got the key {k:?} (operators and fields cannot be mixed in one object)"
                )))
            }
        };
        at.pop();
        conds.push(cond);
    }
    Ok(if conds.len() == 1 {
        conds.pop().expect("one condition")
    } else {
        Cond::All(conds)
    })
}

fn parse_scalar(value: &Value, at: &Pointer) -> Result<Scalar, FilterError> {
    Ok(match value {
        Value::Null => Scalar::Null,
        Value::Bool(b) => Scalar::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Scalar::Int(i),
            None => Scalar::Real(
                n.as_f64()
                    .ok_or_else(|| at.err(format!("number {n} is out of range")))?,
            ),
        },
        Value::String(s) => Scalar::Text(s.clone()),
        other => {
            return Err(at.err(format!(
                "expected a string, number, boolean or null, got {}",
                type_name(other)
            )))
        }
    })
}

fn parse_ordered(value: &Value, at: &Pointer) -> Result<Scalar, FilterError> {
    match value {
        Value::Number(_) | Value::String(_) => parse_scalar(value, at),
        other => Err(at.err(format!(
            "range operators compare numbers or strings, got {}",
            type_name(other)
        ))),
    }
}

fn node_sql(node: &Node, column: &'static str, sql: &mut String, params: &mut Vec<SqlValue>) {
    match node {
        Node::And(nodes) | Node::Or(nodes) => {
            if nodes.is_empty() {
                sql.push('1');
                return;
            }
            let joiner = if matches!(node, Node::And(_)) {
                " AND "
            } else {
                " OR "
            };
            join_balanced(0, nodes.len(), joiner, sql, &mut |i, sql| {
                node_sql(&nodes[i], column, sql, params)
            });
        }
        Node::Not(inner) => {
            sql.push_str("(NOT ");
            node_sql(inner, column, sql, params);
            sql.push(')');
        }
        Node::Field { json_path, cond } => cond_sql(cond, column, json_path, sql, params),
    }
}

/// `EXISTS` over the value at the path, or over its elements when it is an array (`json_each` of a scalar
/// yields the scalar itself; of an object its members, which are excluded: objects never compare).
fn any_sql(
    column: &'static str,
    path: &str,
    sql: &mut String,
    params: &mut Vec<SqlValue>,
    body: &str,
) {
    sql.push_str("EXISTS (SELECT 1 FROM json_each(");
    sql.push_str(column);
    sql.push_str(", ?) AS e WHERE json_type(");
    sql.push_str(column);
    sql.push_str(", ?) <> 'object' AND (");
    sql.push_str(body);
    sql.push_str("))");
    params.push(SqlValue::Text(path.to_owned()));
    params.push(SqlValue::Text(path.to_owned()));
}

/// The condition on one json_each row `e` for equality with `value`, and its parameter.
fn eq_body(value: &Scalar, body: &mut String, body_params: &mut Vec<SqlValue>) {
    match value {
        Scalar::Null => body.push_str("e.type = 'null'"),
        Scalar::Bool(true) => body.push_str("e.type = 'true'"),
        Scalar::Bool(false) => body.push_str("e.type = 'false'"),
        Scalar::Int(i) => {
            body.push_str("(e.type IN ('integer', 'real') AND e.value = ?)");
            body_params.push(SqlValue::Integer(*i));
        }
        Scalar::Real(r) => {
            body.push_str("(e.type IN ('integer', 'real') AND e.value = ?)");
            body_params.push(SqlValue::Real(*r));
        }
        Scalar::Text(s) => {
            body.push_str("(e.type = 'text' AND e.value = ?)");
            body_params.push(SqlValue::Text(s.clone()));
        }
    }
}

fn in_sql(
    values: &[Scalar],
    column: &'static str,
    path: &str,
    sql: &mut String,
    params: &mut Vec<SqlValue>,
) {
    if values.is_empty() {
        sql.push('0');
        return;
    }
    let mut body = String::new();
    let mut body_params = Vec::new();
    join_balanced(0, values.len(), " OR ", &mut body, &mut |i, body| {
        eq_body(&values[i], body, &mut body_params)
    });
    sql.push('(');
    if values.contains(&Scalar::Null) {
        // null also matches a missing field
        sql.push_str("json_type(");
        sql.push_str(column);
        sql.push_str(", ?) IS NULL OR ");
        params.push(SqlValue::Text(path.to_owned()));
    }
    any_sql(column, path, sql, params, &body);
    params.extend(body_params);
    sql.push(')');
}

fn cond_sql(
    cond: &Cond,
    column: &'static str,
    path: &str,
    sql: &mut String,
    params: &mut Vec<SqlValue>,
) {
    match cond {
        Cond::Eq(v) => in_sql(std::slice::from_ref(v), column, path, sql, params),
        Cond::In(vs) => in_sql(vs, column, path, sql, params),
        Cond::Ne(v) => {
            sql.push_str("(NOT ");
            in_sql(std::slice::from_ref(v), column, path, sql, params);
            sql.push(')');
        }
        Cond::Nin(vs) => {
            sql.push_str("(NOT ");
            in_sql(vs, column, path, sql, params);
            sql.push(')');
        }
        Cond::Cmp(op, v) => {
            let (types, param) = match v {
                Scalar::Int(i) => ("e.type IN ('integer', 'real')", SqlValue::Integer(*i)),
                Scalar::Real(r) => ("e.type IN ('integer', 'real')", SqlValue::Real(*r)),
                Scalar::Text(s) => ("e.type = 'text'", SqlValue::Text(s.clone())),
                // parse_ordered admits numbers and strings only
                Scalar::Null | Scalar::Bool(_) => {
                    sql.push('0');
                    return;
                }
            };
            let body = format!("{types} AND e.value {} ?", op.sql());
            any_sql(column, path, sql, params, &body);
            params.push(param);
        }
        Cond::Exists(present) => {
            sql.push_str("(json_type(");
            sql.push_str(column);
            sql.push_str(if *present {
                ", ?) IS NOT NULL)"
            } else {
                ", ?) IS NULL)"
            });
            params.push(SqlValue::Text(path.to_owned()));
        }
        Cond::Not(inner) => {
            sql.push_str("(NOT ");
            cond_sql(inner, column, path, sql, params);
            sql.push(')');
        }
        Cond::All(conds) => join_balanced(0, conds.len(), " AND ", sql, &mut |i, sql| {
            cond_sql(&conds[i], column, path, sql, params)
        }),
    }
}

/// Emits items `lo..hi` joined by `joiner` as a balanced tree of parentheses, in order (so parameters stay
/// in the order of their placeholders): SQLite limits expression depth to 1,000, and a flat `a OR b OR …`
/// of a long list is a chain as deep as the list.
fn join_balanced(
    lo: usize,
    hi: usize,
    joiner: &str,
    sql: &mut String,
    item: &mut dyn FnMut(usize, &mut String),
) {
    if hi - lo == 1 {
        item(lo, sql);
        return;
    }
    let mid = lo + (hi - lo) / 2;
    sql.push('(');
    join_balanced(lo, mid, joiner, sql, item);
    sql.push_str(joiner);
    join_balanced(mid, hi, joiner, sql, item);
    sql.push(')');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(filter: Value) -> String {
        Filter::parse(&filter).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_their_position() {
        assert_eq!(
            err(json!({"$and": [{"a": 1}, {"year": {"$gtx": 3}}]})),
            "/$and/1/year/$gtx: unknown operator \"$gtx\""
        );
        assert!(err(json!({"$nor": []})).starts_with("/$nor: unknown operator"));
        assert!(err(json!([1])).starts_with("<root>: expected a filter object, got an array"));
        assert!(err(json!({"$and": []})).starts_with("/$and: $and needs at least one filter"));
        assert!(err(json!({"$or": {"a": 1}})).starts_with("/$or: expected a list, got an object"));
        assert!(
            err(json!({"$or": [1]})).starts_with("/$or/0: expected a filter object, got a number")
        );
        assert!(err(json!({"$not": 1})).starts_with("/$not: expected a filter object"));
        assert!(err(json!({"a": {}})).starts_with("/a: empty operator object"));
        assert!(err(json!({"a": {"b": 1}})).starts_with("/a: an object cannot be compared"));
        assert!(err(json!({"a": [1, 2]})).starts_with("/a: an array cannot be compared"));
        assert!(err(json!({"a": {"$gt": 1, "b": 2}})).starts_with("/a/b: expected an operator"));
        assert!(err(json!({"a": {"$gt": true}}))
            .starts_with("/a/$gt: range operators compare numbers or strings"));
        assert!(err(json!({"a": {"$gte": null}})).starts_with("/a/$gte: range operators"));
        assert!(err(json!({"a": {"$eq": [1]}}))
            .starts_with("/a/$eq: expected a string, number, boolean or null"));
        assert!(err(json!({"a": {"$in": 1}})).starts_with("/a/$in: expected a list, got a number"));
        assert!(
            err(json!({"a": {"$nin": [1, {"x": 1}]}})).starts_with("/a/$nin/1: expected a string")
        );
        assert!(err(json!({"a": {"$exists": 1}})).starts_with("/a/$exists: expected true or false"));
        assert!(err(json!({"a": {"$not": 3}})).starts_with("/a/$not: expected an operator object"));
        assert!(
            err(json!({"a..b": 1})).starts_with("/a..b: field key \"a..b\" has an empty segment")
        );
        assert!(err(json!({".a": 1})).contains("empty segment"));
        assert!(err(json!({"a\"b": 1})).contains("cannot be used in a field key"));
        assert!(err(json!({"a\\b": 1})).contains("cannot be used in a field key"));
        assert!(err(json!({"a\nb": 1})).contains("cannot be used in a field key"));
        // JSON pointer escaping of '/' and '~'
        assert!(err(json!({"a/b~c": {"$bad": 1}})).starts_with("/a~1b~0c/$bad: unknown operator"));
        assert!("{not json"
            .parse::<Filter>()
            .unwrap_err()
            .to_string()
            .starts_with("<root>: not valid JSON"));
    }

    #[test]
    fn limits_are_enforced() {
        let mut deep = json!({"a": 1});
        for _ in 0..MAX_DEPTH {
            deep = json!({"$not": deep});
        }
        let e = Filter::parse(&deep).unwrap_err();
        assert!(e.message.contains("deeper than 32"), "{e}");
        let mut ok = json!({"a": 1});
        for _ in 0..MAX_DEPTH - 2 {
            ok = json!({"$not": ok});
        }
        Filter::parse(&ok).unwrap();
        let long: Vec<i64> = (0..=MAX_LIST as i64).collect();
        let e = Filter::parse(&json!({"a": {"$in": long}})).unwrap_err();
        assert_eq!(e.pointer, "/a/$in");
        assert!(e.message.contains("at most 1024"));
        let big: Vec<Value> = (0..40)
            .map(|_| json!({"a": {"$in": long[..1000]}}))
            .collect();
        let e = Filter::parse(&json!({ "$or": big })).unwrap_err();
        assert_eq!(e.pointer, "");
        assert!(e.message.starts_with("filter is too large"), "{e}");
        let e = Filter::parse(&json!({ "k".repeat(MAX_KEY_LEN + 1): 1 })).unwrap_err();
        assert!(e.message.contains("at most 1024"));
    }

    #[test]
    fn paths_are_quoted_segments_and_values_are_parameters() {
        let f = Filter::parse(&json!({"source.site": "xyzzy", "a') OR 1=1 --": 1})).unwrap();
        let mut sql = String::new();
        let mut params = Vec::new();
        f.to_sql("d.metadata", &mut sql, &mut params);
        assert!(
            !sql.contains("source") && !sql.contains("OR 1=1") && !sql.contains("xyzzy"),
            "{sql}"
        );
        assert!(params.contains(&SqlValue::Text("$.\"source\".\"site\"".into())));
        assert!(params.contains(&SqlValue::Text("$.\"a') OR 1=1 --\"".into())));
        assert_eq!(sql.matches('?').count(), params.len());
    }
}
