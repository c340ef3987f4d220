"""Text → AST. Lark does the parsing; this module turns its errors into `SpecError`s."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken,
                             VisitError)
from lark.indenter import Indenter

from . import ast as A
from .diagnostics import SpecError
from .printer import print_expr
from .source import SourceFile, Span


class _IndentError(Exception):
    def __init__(self, token: Token, message: str):
        super().__init__(message)
        self.token = token
        self.message = message


class _KeywordError(Exception):
    """A keyword spelled where a name is expected (`let mask = 3`, `pattern true:`)."""

    def __init__(self, token: Token):
        super().__init__(f"`{token}` is a keyword")
        self.token = token


def _reject_keyword(token: Token) -> Token:
    """Lexer callback for NAME: the lexer reads a keyword as a NAME where no keyword can stand
    (after `let`, in a parameter list, ...); keywords are reserved, so that is an error."""
    if token in A.KEYWORDS:
        raise _KeywordError(token)
    return token


class AttnIndenter(Indenter):
    """Python-style INDENT/DEDENT tokens; a dedent to a column never opened is an error."""

    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8

    def handle_NL(self, token: Token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield Token.new_borrow_pos(self.INDENT_type, indent_str, token)
        else:
            open_levels = list(self.indent_level)
            while indent < self.indent_level[-1]:
                self.indent_level.pop()
                yield Token.new_borrow_pos(self.DEDENT_type, indent_str, token)
            if indent != self.indent_level[-1]:
                raise _IndentError(token, f"inconsistent indentation: this line is indented by {indent} "
                                          f"columns, which matches no enclosing block "
                                          f"(open blocks are at {', '.join(map(str, open_levels))})")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("attnc.dsl").joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", postlex=AttnIndenter(), propagate_positions=True,
                maybe_placeholders=True, lexer_callbacks={"NAME": _reject_keyword})


# ----------------------------------------------------------------------------- AST building

class _Build(Transformer):
    def __init__(self, source: SourceFile):
        super().__init__()
        self.src = source

    def _span(self, meta) -> Span | None:
        if getattr(meta, "empty", True):
            return None
        return Span(self.src, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, tok: Token) -> Span:
        return Span(self.src, tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + len(tok))

    # top level
    @v_args(meta=True)
    def start(self, meta, items):
        imports = tuple(i for i in items if isinstance(i, A.Import))
        patterns = tuple(i for i in items if isinstance(i, A.Pattern))
        defs = tuple(i for i in items if isinstance(i, A.Def))
        return A.Module(imports, patterns, defs, span=self._span(meta))

    def dotted_name(self, names):
        return ".".join(str(n) for n in names), names[0]

    @v_args(meta=True)
    def import_std(self, meta, items):
        (path, _), alias = items
        return A.Import(path, str(alias) if alias else None, False, span=self._span(meta))

    @v_args(meta=True)
    def import_file(self, meta, items):
        path, alias = items
        return A.Import(str(path)[1:-1], str(alias) if alias else None, True, span=self._span(meta))

    @v_args(meta=True)
    def pattern(self, meta, items):
        name, params, *body = items
        span = self._tok(name)
        return A.Pattern(str(name), tuple(params or ()), tuple(body), span=span)

    def params(self, items):
        return tuple(p for p in items if p is not None)

    @v_args(meta=True)
    def param(self, meta, items):
        name, typ, default = items
        return A.Param(str(name), str(typ), default, span=self._span(meta))

    # statements
    @v_args(meta=True)
    def tensor_decl(self, meta, items):
        name, elem, *dims = items
        return A.TensorDecl(str(name), str(elem), tuple(d for d in dims if d is not None),
                            span=self._span(meta))

    @v_args(meta=True)
    def let_stmt(self, meta, items):
        name, value = items
        return A.Let(str(name), value, span=self._span(meta))

    @v_args(meta=True)
    def mask_stmt(self, meta, items):
        return A.Mask(items[0], span=self._span(meta))

    @v_args(meta=True)
    def score_stmt(self, meta, items):
        op, value = items
        return A.ScoreStmt(op, value, span=self._span(meta))

    def score_op(self, items):
        return str(items[0])

    @v_args(meta=True)
    def select_stmt(self, meta, items):
        kind, args = items
        return A.Select(str(kind), tuple(args or ()), span=self._span(meta))

    @v_args(meta=True)
    def normalize_stmt(self, meta, items):
        kind, args = items
        return A.Normalize(str(kind), tuple(args or ()), span=self._span(meta))

    @v_args(meta=True)
    def use_stmt(self, meta, items):
        (target, _), args = items
        return A.Use(target, tuple(args or ()), span=self._span(meta))

    @v_args(meta=True)
    def require_stmt(self, meta, items):
        return A.Require(items[0], span=self._span(meta))

    @v_args(meta=True)
    def def_stmt(self, meta, items):
        name, *rest = items
        *params, body = rest
        return A.Def(str(name), tuple(p for p in params if p is not None), body, span=self._tok(name))

    @v_args(meta=True)
    def def_param(self, meta, items):
        name, typ = items
        return A.DefParam(str(name), str(typ) if typ is not None else None, span=self._span(meta))

    def arglist(self, items):
        return tuple(a for a in items if a is not None)

    @v_args(meta=True)
    def kwarg(self, meta, items):
        name, value = items
        return A.Arg(str(name), value, span=self._span(meta))

    @v_args(meta=True)
    def posarg(self, meta, items):
        return A.Arg(None, items[0], span=self._span(meta))

    # expressions
    @v_args(meta=True)
    def ifexp(self, meta, items):
        body, cond, orelse = items
        return A.IfExp(body, cond, orelse, span=self._span(meta))

    def _bin(op):
        @v_args(meta=True)
        def build(self, meta, items):
            return A.Binary(op, items[0], items[1], span=self._span(meta))
        return build

    or_ = _bin("or")
    and_ = _bin("and")
    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    floordiv = _bin("//")
    mod = _bin("%")
    pow = _bin("**")
    bitor = _bin("|")
    bitxor = _bin("^")
    bitand = _bin("&")
    lshift = _bin("<<")
    rshift = _bin(">>")

    def _un(op):
        @v_args(meta=True)
        def build(self, meta, items):
            return A.Unary(op, items[0], span=self._span(meta))
        return build

    not_ = _un("not")
    neg = _un("-")
    pos = _un("+")
    invert = _un("~")

    @v_args(meta=True)
    def compare(self, meta, items):
        operands = tuple(items[0::2])
        ops = tuple(str(t) for t in items[1::2])
        for x in operands[1:-1]:  # `q >= k & k < w` reads `q >= (k & k) < w`: almost always a slip
            if isinstance(x, A.Binary) and x.op in ("&", "|") and not self._parenthesized(x):
                word = "and" if x.op == "&" else "or"
                raise SpecError(self._operator_span(x),
                                f"`{x.op}` binds tighter than comparisons: this compares with "
                                f"`{print_expr(x)}`",
                                f"write `{word}` to combine conditions; parenthesize a bit "
                                f"operation you mean to compare: `(k {x.op} m) == 0`")
        return A.Compare(ops, operands, span=self._span(meta))

    def _parenthesized(self, e: A.Expr) -> bool:
        sp = e.span
        if sp is None or sp.line != sp.end_line:
            return True  # nothing to check against: let it through
        text = self.src.line(sp.line)
        return text[:sp.col - 1].rstrip().endswith("(") and text[sp.end_col - 1:].lstrip().startswith(")")

    def _operator_span(self, e: A.Binary) -> Span | None:
        """The span of the operator of `e`, between its operands on one line (else all of `e`)."""
        a, b = e.left.span, e.right.span
        if a is None or b is None or a.end_line != b.line:
            return e.span
        text = self.src.line(b.line)
        at = text.find(e.op, a.end_col - 1, b.col - 1)
        return Span(self.src, b.line, at + 1, b.line, at + 1 + len(e.op)) if at >= 0 else e.span

    @v_args(meta=True)
    def number(self, meta, items):
        text = str(items[0])
        based = text[:2].lower() in ("0x", "0b")
        if (based and len(text) > 66) or (not based and not any(c in text for c in ".eE")
                                           and len(text.lstrip("0")) > 19):
            # longer than any 64-bit int (and Python refuses to convert > 4300 digits)
            raise SpecError(self._span(meta), "integer literal does not fit in 64 bits")
        value = int(text, 0) if based else float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(value, int) and value >= 2 ** 63:
            raise SpecError(self._span(meta), "integer literal does not fit in 64 bits")
        return A.Num(value, span=self._span(meta))

    @v_args(meta=True)
    def true(self, meta, items):
        return A.Bool(True, span=self._span(meta))

    @v_args(meta=True)
    def false(self, meta, items):
        return A.Bool(False, span=self._span(meta))

    @v_args(meta=True)
    def score_ref(self, meta, items):
        return A.Name("score", span=self._span(meta))

    @v_args(meta=True)
    def name(self, meta, items):
        return A.Name(str(items[0]), span=self._span(meta))

    @v_args(meta=True)
    def call(self, meta, items):
        (func, _), args = items
        args = args or ()
        keyword = next((a for a in args if a.name is not None), None)
        late = next((a for a in args[args.index(keyword):] if a.name is None), None) if keyword else None
        if late is not None:
            raise SpecError(late.span, "a positional argument cannot follow a keyword argument",
                            "give the positional arguments first, or name this one too")
        return A.Call(func, tuple(a.value for a in args if a.name is None),
                      tuple(a for a in args if a.name is not None), span=self._span(meta))

    @v_args(meta=True)
    def index(self, meta, items):
        tensor, *indices = items
        return A.Index(str(tensor), tuple(indices), span=self._span(meta))

    @v_args(meta=True)
    def sum_gen(self, meta, items):
        body, var, count = items
        return A.SumGen(body, str(var), count, span=self._span(meta))

    @v_args(meta=True)
    def any_gen(self, meta, items):
        body, var, count = items
        return A.SumGen(body, str(var), count, span=self._span(meta), kind="any")

    @v_args(meta=True)
    def all_gen(self, meta, items):
        body, var, count = items
        return A.SumGen(body, str(var), count, span=self._span(meta), kind="all")


# ----------------------------------------------------------------------------- errors

_TOKEN_TEXT = {
    "COLON": "`:`", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "COMMA": "`,`",
    "EQUAL": "`=`", "_NL": "end of line", "_INDENT": "an indented block", "_DEDENT": "end of block",
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "COMP_OP": "a comparison",
    "$END": "end of file", "DOT": "`.`", "PLUS": "`+`", "MINUS": "`-`", "STAR": "`*`",
    "SLASH": "`/`", "PERCENT": "`%`", "MORETHAN": "`>`", "LESSTHAN": "`<`",
}


#: operators of other languages, longest first, and the word this language spells them with
_FOREIGN_OPERATORS = (("&&", "and"), ("||", "or"), ("!", "not"))


def _describe_expected(expected) -> str:
    names = []
    for e in sorted(expected):
        if e.startswith("__ANON"):
            continue
        text = _TOKEN_TEXT.get(e)
        if text is None:
            text = f"`{e.lower()}`" if e.isupper() and e.isalpha() else e
        names.append(text)
    names = sorted(set(names))
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    if len(names) > 6:
        return ", ".join(names[:6]) + ", …"
    return ", ".join(names[:-1]) + " or " + names[-1]


def _describe_token(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "_INDENT":
        return "an unexpected indent"
    if tok.type == "_DEDENT":
        return "end of block"
    if tok.type == "$END":
        return "end of file"
    return f"`{tok}`"


def _error_span(src: SourceFile, line: int, col: int, length: int = 1) -> Span:
    return Span(src, line, col, line, col + max(1, length))


def _convert(src: SourceFile, err: Exception) -> SpecError:
    if isinstance(err, _IndentError):
        tok = err.token
        line = tok.end_line or tok.line
        text = src.line(line)
        col = len(text) - len(text.lstrip()) + 1
        return SpecError(_error_span(src, line, col), err.message,
                         "indent every statement of a pattern by the same amount")
    if isinstance(err, _KeywordError):
        tok = err.token
        return SpecError(_error_span(src, tok.line, tok.column, len(tok)),
                         f"`{tok}` is a keyword and cannot be used as a name",
                         f"pick another name, e.g. `{tok}_`")
    if isinstance(err, UnexpectedCharacters):
        ch = src.text[err.pos_in_stream] if err.pos_in_stream < len(src.text) else "?"
        pair = src.text[err.pos_in_stream:err.pos_in_stream + 2]
        for spelled, word in _FOREIGN_OPERATORS:
            if pair.startswith(spelled):
                return SpecError(_error_span(src, err.line, err.column, len(spelled)),
                                 f"`{spelled}` is not an operator of the language",
                                 f"write `{word}`: the boolean operators are `and`, `or` and `not`")
        shown = f"`{ch}`" if ch.isprintable() else f"U+{ord(ch):04X}"
        return SpecError(_error_span(src, err.line, err.column), f"unexpected character {shown}")
    if isinstance(err, UnexpectedToken):
        tok = err.token
        expected = _describe_expected(err.expected)
        if tok.type == "$END" or tok.line is None:
            lines = src.text.rstrip("\n").splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        elif tok.type in ("_NL",):
            line, col = tok.line, tok.column
        elif tok.type in ("_INDENT", "_DEDENT"):
            line = tok.end_line or tok.line
            text = src.line(line)
            col = len(text) - len(text.lstrip()) + 1
        else:
            line, col = tok.line, tok.column
        length = len(tok) if tok.type not in ("_NL", "_INDENT", "_DEDENT", "$END") else 1
        if tok.type == "_INDENT":
            return SpecError(_error_span(src, line, col), "unexpected indent",
                             "statements of one block must start at the same column")
        pair = src.text[tok.start_pos - 1:tok.start_pos + 1] if tok.start_pos else ""
        for spelled, word in _FOREIGN_OPERATORS:
            if pair == spelled:  # `&&`, `||`: the second of two bit operators
                return SpecError(_error_span(src, line, col - 1, 2),
                                 f"`{spelled}` is not an operator of the language",
                                 f"write `{word}`: the boolean operators are `and`, `or` and `not`")
        if "NAME" in err.expected and "NUMBER" in err.expected:
            expected = "an expression"
        before = [ln.split("#")[0].rstrip() for ln in src.text.splitlines()[:line - 1]]
        prev = next((ln for ln in reversed(before) if ln), "")
        if "_INDENT" in err.expected or (line > 1 and prev.endswith(":") and col == 1):
            return SpecError(_error_span(src, line, col, length),
                             f"expected an indented block, found {_describe_token(tok)}",
                             "the statements of a pattern are indented under its header")
        if tok.type == "EQUAL" and "COMP_OP" in err.expected:
            return SpecError(_error_span(src, line, col, length), "`=` is not a comparison",
                             "write `==` to compare; `=` only gives a value (`let x = ...`, "
                             "`score = ...`, `name = value` in arguments)")
        msg = f"expected {expected}, found {_describe_token(tok)}" if expected else \
            f"unexpected {_describe_token(tok)}"
        hint = None
        if "COLON" in err.expected and tok.type == "_NL":
            hint = "a pattern header ends with `:`, e.g. `pattern p(w: int = 8):`"
        elif str(tok) in A.KEYWORDS and "NAME" in err.expected:
            hint = f"`{tok}` is a keyword and cannot be used as a name"
        return SpecError(_error_span(src, line, col, length), msg, hint)
    if isinstance(err, UnexpectedEOF):
        lines = src.text.rstrip("\n").splitlines() or [""]
        return SpecError(_error_span(src, len(lines), len(lines[-1]) + 1), "unexpected end of file")
    if isinstance(err, UnexpectedInput):
        return SpecError(_error_span(src, getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1),
                         "syntax error")
    return SpecError(None, f"{src.path}: could not parse: {err}")


def parse(text: str, path: str = "<string>") -> A.Module:
    """Parse `.attn` text into a `Module`; syntax errors raise `SpecError`."""
    src = SourceFile(path, text)
    body = text if text.endswith("\n") else text + "\n"
    try:
        tree = _lark().parse(body)
    except (LarkError, _IndentError, _KeywordError) as err:
        raise _convert(src, err) from None
    except RecursionError:
        raise SpecError(Span(src, 1, 1, 1, 2), "expression is nested too deeply") from None
    try:
        return _Build(src).transform(tree)
    except VisitError as err:  # lark wraps errors raised inside the transformer
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    except RecursionError:
        raise SpecError(Span(src, 1, 1, 1, 2), "expression is nested too deeply") from None
