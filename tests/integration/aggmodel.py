"""aggmodel - a reference model of gatherd's aggregate answers, written from
the README ("Aggregate routes": Route keys, Call keys, Templates, Conditions,
Enrichment, Answers), not from src/. test_aggoracle.py compares gatherd with
it.

Input: an aggregate route as it is written in the configuration, the
configuration's backends, what each backend does with each exchange (a
Behaviour, below) and the client request's query, headers and path
parameters (for conditions). Output: the answer the README promises
(Expect).

Time is modelled only as far as the README makes it matter: a call starts
when its last dependency succeeded; an answer costs no time unless it is
"slow"; the call's timeout_ms and the route's deadline_ms end what runs past
them. A result that depends on an order the README leaves open (two failures
at the same instant that would decide different things) raises Ambiguous, so
a generator can leave such cells out.
"""

import json
import re

# README "Answers": the status of a required call's failure, and the codes
# answered with Retry-After.
REQUIRED_STATUS = {"timeout": 504, "unavailable": 503, "queue_full": 503, "queue_timeout": 503,
                   "circuit_open": 503}
RETRY_AFTER = ("queue_full", "queue_timeout", "circuit_open")

DEFAULT_DEADLINE_MS = 5000
DEFAULT_BACKEND_TIMEOUT_MS = 30000
DEFAULT_MAX_RESPONSE_BYTES = 8388608
DEFAULT_FOREACH_MAX = 100
DEFAULT_FOREACH_CONCURRENCY = 8


class Ambiguous(Exception):
    """The README does not decide this cell's answer."""


# --- what a backend does -------------------------------------------------------------------------

class Behaviour:
    """What the backend does with one exchange:
    answer(status, text)  a complete response with that body text ("" for none)
    cut(status)           a response head with status, then the connection closes mid-body
    close()               the connection closes before any byte of a response
    garbage()             bytes that are not HTTP
    refused()             the connection is refused
    breaker_open()        the backend's circuit breaker is open (nothing is sent)
    slow(ms, then)        nothing for ms milliseconds, then behaves as then
    """

    def __init__(self, kind, status=None, text=None, delay_ms=0, then=None):
        self.kind, self.status, self.text, self.delay_ms, self.then = kind, status, text, delay_ms, then

    def __repr__(self):
        if self.kind == "slow":
            return f"slow({self.delay_ms}, {self.then!r})"
        return f"{self.kind}({self.status!r}, {self.text!r})" if self.status or self.text else f"{self.kind}()"


def answer(status, text):
    return Behaviour("answer", status=status, text=text)


def cut(status):
    return Behaviour("cut", status=status)


def close():
    return Behaviour("close")


def garbage():
    return Behaviour("garbage")


def refused():
    return Behaviour("refused")


def breaker_open():
    return Behaviour("open")


def slow(ms, then):
    return Behaviour("slow", delay_ms=ms, then=then)


# --- JSON as the README describes it -----------------------------------------------------------

def _no_constant(name):
    raise ValueError(f"not JSON: {name}")


def parse_json(text):
    """A backend body as the README accepts it: any JSON value; an integer
    beyond 64 bits is refused (jansson holds int64). None when refused."""
    try:
        v = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return None, False

    def ints_fit(x):
        if isinstance(x, bool):
            return True
        if isinstance(x, int):
            return -2 ** 63 <= x < 2 ** 63
        if isinstance(x, list):
            return all(ints_fit(e) for e in x)
        if isinstance(x, dict):
            return all(ints_fit(e) for e in x.values())
        return True

    return (v, True) if ints_fit(v) else (None, False)


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def jpath_steps(path):
    """"data.items[0].id" -> ["data", "items", 0, "id"] (README: dotted keys
    with [N] indexes)."""
    steps, pos = [], 0
    while pos < len(path):
        if path[pos] == ".":
            pos += 1
            continue
        m = _STEP.match(path, pos)
        if not m:
            raise ValueError(f"bad JSON path {path!r}")
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return steps


_ABSENT = object()


def jpath_get(value, path):
    """The value at path, or _ABSENT."""
    for s in jpath_steps(path):
        if isinstance(s, int):
            if not isinstance(value, list) or s >= len(value):
                return _ABSENT
        elif not isinstance(value, dict) or s not in value:
            return _ABSENT
        value = value[s]
    return value


def allow(value, paths):
    """README: only the listed paths are kept, everything else is dropped;
    absent paths keep nothing. Containers on the way keep only what leads to
    a kept value. A value that is neither an object nor an array keeps
    nothing: {} (README "Call keys", after the table)."""
    if isinstance(value, list):
        raise Ambiguous("allow on an array is not modelled")
    if not isinstance(value, dict):
        return {}
    out = {}
    for p in paths:
        steps = jpath_steps(p)
        if any(isinstance(s, int) for s in steps):
            raise Ambiguous("allow with indexes is not modelled")
        got = jpath_get(value, p)
        if got is _ABSENT:
            continue
        node = out
        for s in steps[:-1]:
            node = node.setdefault(s, {})
        node[steps[-1]] = json.loads(json.dumps(got))
    return out


def deny(value, paths):
    """README: the listed paths are dropped; absent ones are ignored."""
    value = json.loads(json.dumps(value))
    for p in paths:
        steps = jpath_steps(p)
        parent = value
        for s in steps[:-1]:
            if isinstance(s, int):
                parent = parent[s] if isinstance(parent, list) and s < len(parent) else None
            else:
                parent = parent.get(s) if isinstance(parent, dict) else None
        last = steps[-1]
        if isinstance(last, int):
            if isinstance(parent, list) and last < len(parent):
                del parent[last]
        elif isinstance(parent, dict):
            parent.pop(last, None)
    return value


def shape(call, answer_value):
    """README: target, then allow or deny, then rename. (ok, value); not ok
    when target finds nothing (missing_target)."""
    v = answer_value
    if "target" in call:
        v = jpath_get(v, call["target"])
        if v is _ABSENT:
            return False, None
    if "allow" in call:
        v = allow(v, call["allow"])
    elif "deny" in call:
        v = deny(v, call["deny"])
    if "rename" in call and isinstance(v, dict):
        v = {call["rename"].get(k, k): x for k, x in v.items()}
    return True, v


# --- templates ---------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def placeholders(text):
    return [m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1) is not None]


def template_texts(call):
    texts = [call["path"]] + list(call.get("headers", {}).values())

    def walk(b):
        if isinstance(b, str):
            texts.append(b)
        elif isinstance(b, list):
            for e in b:
                walk(e)
        elif isinstance(b, dict):
            for e in b.values():
                walk(e)

    if call.get("body") not in (None, "forward"):
        walk(call["body"])
    return texts


def call_refs(call, names):
    """Calls a call reads in its templates (README: "A template that names a
    call makes the call wait for it")."""
    refs = []
    for t in template_texts(call):
        for ph in placeholders(t):
            head = jpath_steps(ph)[0] if ph else ph
            if head in names and head not in refs:
                refs.append(head)
    return refs


def render_check(call, answers, item):
    """None when every placeholder of the call's templates has a value the
    README lets it use, else "missing_value" / "invalid_value". Only call
    answers and item are modelled (query, header and path parameters are not
    used by the generator)."""
    for t in template_texts(call):
        for ph in placeholders(t):
            steps = jpath_steps(ph)
            head = steps[0]
            if head == "item":
                root, rest = item, ph[len("item"):].lstrip(".")
            elif head in answers:
                root, rest = answers[head], ph[len(head):].lstrip(".")
            else:
                continue
            v = jpath_get(root, rest) if rest else root
            if v is _ABSENT or v is None:
                return "missing_value"
            if isinstance(v, (dict, list)):
                return "invalid_value"
    return None


# --- conditions ("when", README "Conditions") ---------------------------------------------------

class Request:
    """What a condition can read of the client request: query parameters
    (first value of each name, decoded), headers (any case), path
    parameters. All strings."""

    def __init__(self, query=None, headers=None, params=None):
        self.query = dict(query or {})
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.params = dict(params or {})


_TOKENS = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[^{}]+")


def template_parts(text):
    """[("lit", text) | ("ph", placeholder)], "{{" and "}}" as literal braces."""
    parts = []
    for m in _TOKENS.finditer(text):
        t = m.group(0)
        if m.group(1) is not None:
            parts.append(("ph", m.group(1)))
        else:
            t = "{" if t == "{{" else "}" if t == "}}" else t
            if parts and parts[-1][0] == "lit":
                parts[-1] = ("lit", parts[-1][1] + t)
            else:
                parts.append(("lit", t))
    return parts


def ph_head(ph):
    m = re.match(r"[^.\[]*", ph)
    return m.group(0)


def lookup(ph, answers, item, request):
    """README Templates: the value of one placeholder, or _ABSENT.
    answers: call name -> answer for the calls that have one (a skipped
    call has none)."""
    head = ph_head(ph)
    rest = ph[len(head):]
    if head == "query":
        return request.query.get(rest[1:], _ABSENT)
    if head == "header":
        return request.headers.get(rest[1:].lower(), _ABSENT)
    if head == "item":
        root = item
    elif head in answers:
        root = answers[head]
    elif head in request.params and not rest:
        return request.params[head]
    else:
        return _ABSENT
    return jpath_get(root, rest.lstrip(".")) if rest else root


def as_text(v):
    """README Templates: values written as text; None when they cannot be."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # the shortest text that reads back as the same double, as C's %g
        # writes it (4.0 is "4", 1e300 "1e+300")
        for prec in (15, 16, 17):
            t = "%.*g" % (prec, v)
            if float(t) == v:
                return t
    return None  # null, object, array


def template_value(text, answers, item, request):
    """README Conditions, Values: one placeholder alone has the value with
    its JSON type; text with placeholders is a string; _ABSENT when it
    cannot be made."""
    parts = template_parts(text)
    if len(parts) == 1 and parts[0][0] == "ph":
        return lookup(parts[0][1], answers, item, request)
    out = ""
    for kind, t in parts:
        if kind == "lit":
            out += t
            continue
        v = lookup(t, answers, item, request)
        if v is _ABSENT:
            return _ABSENT
        txt = as_text(v)
        if txt is None:
            return _ABSENT
        out += txt
    return out


def jeq(a, b):
    """README Conditions, Equality: JSON's; numbers by value, never with
    booleans or strings; objects in any order."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if num(a) and num(b):
        return a == b  # Python compares an int with a float exactly
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(jeq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(jeq(a[k], b[k]) for k in a)
    return a == b


def cond_holds(cond, answers, item, request):
    if "all" in cond:
        return all(cond_holds(c, answers, item, request) for c in cond["all"])
    if "any" in cond:
        return any(cond_holds(c, answers, item, request) for c in cond["any"])
    if "not" in cond:
        return not cond_holds(cond["not"], answers, item, request)
    if "exists" in cond:
        v = template_value(cond["exists"], answers, item, request)
        return v is not _ABSENT and v is not None
    v = template_value(cond["value"], answers, item, request)
    if v is _ABSENT:
        return False
    if "equals" in cond:
        return jeq(v, cond["equals"])
    return any(jeq(v, x) for x in cond["in"])


def cond_templates(cond):
    if "all" in cond or "any" in cond:
        return [t for c in cond.get("all", cond.get("any")) for t in cond_templates(c)]
    if "not" in cond:
        return cond_templates(cond["not"])
    return [cond.get("exists", cond.get("value"))]


def cond_refs(call, names):
    """Calls a call's condition names (README: it waits for them)."""
    refs = []
    for t in cond_templates(call["when"]) if "when" in call else []:
        for kind, ph in template_parts(t):
            if kind == "ph" and ph_head(ph) in names and ph_head(ph) not in refs:
                refs.append(ph_head(ph))
    return refs


def cond_uses_item(call):
    return "when" in call and any(kind == "ph" and ph_head(ph) == "item"
                                  for t in cond_templates(call["when"]) for kind, ph in template_parts(t))


# --- one exchange -------------------------------------------------------------------------------

class Outcome:
    def __init__(self, end, code=None, status=None, value=None):
        self.end, self.code, self.status, self.value = end, code, status, value

    @property
    def ok(self):
        return self.code is None


def exchange(beh, backend, timeout_ms, start, deadline):
    """One call (or foreach element) against its backend, README "Answers".
    Returns Outcome(end time, code, backend status, parsed answer)."""
    limit_end = min(start + timeout_ms, deadline)
    delay = 0
    while beh.kind == "slow":
        delay += beh.delay_ms
        beh = beh.then
    if start + delay >= limit_end:
        return Outcome(limit_end, "timeout")
    end = start + delay
    k = beh.kind
    if k == "open":
        return Outcome(end, "circuit_open")
    if k == "refused":
        return Outcome(end, "connect_failed")
    if k == "close":
        return Outcome(end, "truncated")
    if k == "garbage":
        return Outcome(end, "bad_response")
    if k == "cut":
        return Outcome(end, "truncated", beh.status)
    assert k == "answer", k
    st = beh.status
    if not 200 <= st <= 299:
        return Outcome(end, "bad_status", st)
    text = beh.text or ""
    if len(text.encode()) > backend.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES):
        return Outcome(end, "too_large", st)
    if st == 204 and text == "":
        return Outcome(end, None, st, None)
    v, good = parse_json(text)
    if not good:
        return Outcome(end, "bad_json", st)
    return Outcome(end, None, st, v)


# --- the aggregate ------------------------------------------------------------------------------

class CallResult:
    def __init__(self, name):
        self.name = name
        self.code = None        # None: succeeded
        self.status = None      # the backend's status when it answered
        self.answer = None      # the answer as sent (templates, foreach)
        self.value = None       # shaped value
        self.has_value = False  # the call has a place in the aggregate
        self.failed = None      # foreach: indexes of failed elements
        self.end = 0.0
        self.raw = False        # copied unparsed (README: no template/when/foreach reads it, no shaping, group)
        self.skipped = False    # README Conditions: not sent, not a failure
        self.elems = None       # foreach: per element "ok", "failed" or "skipped"


class Expect:
    """What the README says the client gets."""

    def __init__(self):
        self.status = 200
        self.body = None           # the parsed JSON document (request_id left out of errors)
        self.completed = None      # X-Gateway-Completed: True, False, None (absent)
        self.timing = []           # [(call name, desc or None)], in route order; desc "*": not decided
        self.retry_after = False
        self.error_status_field = None
        self.raw_texts = []        # substrings the body holds as the backend wrote them
        self.parsed_calls = []     # calls whose answers are written compactly

    def __repr__(self):
        return (f"Expect(status={self.status}, completed={self.completed}, timing={self.timing}, "
                f"retry_after={self.retry_after}, body={json.dumps(self.body, sort_keys=True)})")


def batch_from(call):
    """README Batched calls: "CALL.path[*].field" -> (CALL, path to the
    array, path inside each element)."""
    f = call["batch"]["from"]
    src = re.match(r"[^.\[]*", f).group(0)
    before, _, after = f[len(src):].partition("[*]")
    return src, before.lstrip("."), after.lstrip(".")


def source_of(call):
    if "batch" in call:
        return batch_from(call)[0]
    return call["foreach"].split(".")[0].split("[")[0]


def array_path(call):
    """The path of the array a foreach or batch call goes through, inside
    its source's answer ("" for the answer itself)."""
    if "batch" in call:
        return batch_from(call)[1]
    return call["foreach"].partition(".")[2]


def into_of(call):
    return call["batch"].get("into") if "batch" in call else call.get("into")


def batch_text(v):
    """README Batched calls: the text a value is sent and matched as, or
    None when it cannot be a value (a template's text; strings non-empty)."""
    if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
        return None
    if isinstance(v, str):
        return v if v and "\0" not in v else None
    return as_text(v)


def needs_of(call, names):
    """README Conditions: a call whose templates, after or foreach name a
    skipped call is skipped too."""
    deps = list(call_refs(call, names))
    for a in call.get("after", []):
        if a not in deps:
            deps.append(a)
    if ("foreach" in call or "batch" in call) and source_of(call) not in deps:
        deps.append(source_of(call))
    return deps


def deps_of(call, names):
    deps = needs_of(call, names)
    for w in cond_refs(call, names):
        if w not in deps:
            deps.append(w)
    return deps


def enrich(answer, into_calls, results):
    """README Enrichment: a copy of the source's answer with each into
    call's results put into the elements they came from, in list order."""
    doc = json.loads(json.dumps(answer))
    for c in into_calls:
        r = results[c["name"]]
        if r.skipped:
            if "skip_value" not in c:
                continue
            puts = None  # every element
        elif r.elems is None:
            continue  # it could not run: nothing is put anywhere
        else:
            puts = r.elems
        path = array_path(c)
        arr = jpath_get(doc, path) if path else doc
        if not isinstance(arr, list):
            continue
        for k, e in enumerate(arr):
            if not isinstance(e, dict):
                continue
            key = into_of(c)
            if puts is None:
                e[key] = json.loads(json.dumps(c["skip_value"]))
                continue
            state, v = puts[k]
            if state == "ok":
                e[key] = v
            elif state == "skipped" and "skip_value" in c:
                e[key] = c["skip_value"]
            elif state == "failed" and "fallback" in c:
                e[key] = c["fallback"]
    return doc


DEFAULT_BATCH_MAX = 100
DEFAULT_BATCH_MAX_ITEMS = 1000
DEFAULT_BATCH_CONCURRENCY = 8


def batch_call(c, r, results, answers, backend, timeout_ms, start, deadline, behave):
    """README Batched calls: one exchange per chunk of the unique values
    (behave(name, chunk index, [value texts])), each answer's elements
    matched back to the source's elements by the text of their match
    field. Fills r as a foreach call's result is filled."""
    b = c["batch"]
    src, path, rest = batch_from(c)
    items = jpath_get(results[src].answer, path) if path else results[src].answer
    if items is _ABSENT or items is None:
        r.code, r.end = "missing_value", start
        return
    if not isinstance(items, list):
        r.code, r.end = "invalid_value", start
        return
    if len(items) > b.get("max_items", DEFAULT_BATCH_MAX_ITEMS):
        r.code, r.end = "too_many_items", start
        return
    bad = render_check(c, answers, None)
    if bad:
        r.code, r.end = bad, start
        return
    into = into_of(c)
    texts, order = [], []
    fails = {}  # element -> code, for those not sent
    for k, e in enumerate(items):
        v = jpath_get(e, rest) if rest else e
        if into is not None and not isinstance(e, dict):
            fails[k] = "invalid_value"
        elif v is _ABSENT or v is None:
            fails[k] = "missing_value"
        elif batch_text(v) is None:
            fails[k] = "invalid_value"
        else:
            texts.append(batch_text(v))
            if texts[-1] not in order:
                order.append(texts[-1])
            continue
        texts.append(None)
    mx = b.get("max", DEFAULT_BATCH_MAX)
    chunks = [order[i:i + mx] for i in range(0, len(order), mx)]
    chunk_of = {t: ci for ci, ch in enumerate(chunks) for t in ch}
    conc = b.get("concurrency", DEFAULT_BATCH_CONCURRENCY)
    slots = [start] * conc
    found, chunk_out = {}, []
    for ci, ch in enumerate(chunks):
        slots.sort()
        t0 = slots[0]
        if t0 >= deadline:
            o = Outcome(deadline, "timeout")
        else:
            o = exchange(behave(c["name"], ci, ch), backend, timeout_ms, t0, deadline)
        if o.ok:
            arr = o.value
            if "target" in c:
                arr = jpath_get(arr, c["target"])
            if arr is _ABSENT:
                o = Outcome(o.end, "missing_target", o.status)
            elif not isinstance(arr, list):
                o = Outcome(o.end, "invalid_value", o.status)
            else:
                match = b.get("match", "id")
                for e in arr:
                    t = batch_text(jpath_get(e, match))
                    if t in ch and t not in found:
                        found[t] = e
        slots[0] = o.end
        chunk_out.append(o)
    shaper = {k: v for k, v in c.items() if k in ("allow", "deny", "rename")}
    fb = c.get("fallback", None)
    elems, values, outs, r.missing = [], [], [], []
    for k, t in enumerate(texts):
        if t is None:
            o = Outcome(start, fails[k])
        else:
            co = chunk_out[chunk_of[t]]
            if not co.ok:
                o = Outcome(co.end, co.code, co.status)
            elif t in found:
                o = Outcome(co.end, None, co.status, found[t])
            else:
                o = Outcome(co.end, "not_found", co.status)
                r.missing.append(k)
        outs.append(o)
        if o.ok:
            _, v = shape(shaper, o.value)
            elems.append(("ok", v))
            values.append(v)
        else:
            elems.append(("failed", None))
            values.append(fb)
    r.answer = [o.value if o.ok else None for o in outs]
    r.value, r.has_value, r.elems = values, True, elems
    r.end = max([o.end for o in outs], default=start)
    bad = [(o.end, k, o) for k, o in enumerate(outs) if not o.ok]
    if not bad:
        return
    r.failed = [k for _, k, o in bad if o.code != "not_found"] or None
    first = min(e for e, _, _ in bad)
    # elements that cannot be sent fail first (before any request), in element order
    unsent = [k for k, t in enumerate(texts) if t is None]
    if unsent:
        o = outs[unsent[0]]
    else:
        firsts = [o for e, _, o in bad if e == first]
        if len({(o.code, o.status) for o in firsts}) > 1:
            raise Ambiguous(f"call {c['name']}: chunks failed at once with {[(o.code, o.status) for o in firsts]}")
        o = firsts[0]
    r.code, r.status = o.code, o.status
    r.end_first_fail = first


def aggregate(route, backends, behave, request=None):
    """route: the route's configuration (dict); backends: name -> backend
    configuration; behave(call_name, element_index, element) -> Behaviour
    (element_index None for a call without foreach); request: a Request (the
    client's query, headers, path parameters), for conditions. Returns an
    Expect."""
    request = request or Request()
    calls = route["calls"]
    names = [c["name"] for c in calls]
    by_name = {c["name"]: c for c in calls}
    deadline = route.get("deadline_ms", DEFAULT_DEADLINE_MS)
    read = set()
    for c in calls:
        read.update(call_refs(c, names))
        read.update(cond_refs(c, names))
        if "foreach" in c or "batch" in c:
            read.add(source_of(c))
    group_mode = route.get("merge", "group") == "group"
    results = {n: CallResult(n) for n in names}
    done = {}

    def timeout_of(c):
        return c.get("timeout_ms", backends[c["backend"]].get("timeout_ms", DEFAULT_BACKEND_TIMEOUT_MS))

    # evaluate in dependency order (the configuration has no cycles)
    order, seen = [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for d in deps_of(by_name[n], names):
            visit(d)
        order.append(n)

    for n in names:
        visit(n)

    for n in order:
        c, r = by_name[n], results[n]
        deps = deps_of(c, names)
        failed_deps = [results[d] for d in deps if results[d].code is not None]
        start = max([results[d].end for d in deps], default=0.0)
        if failed_deps:
            first = min(d.end for d in failed_deps)
            if first >= deadline:
                r.code, r.end = "timeout", deadline
            else:
                r.code, r.end = "dependency_failed", first
            continue
        if start >= deadline:
            r.code, r.end = "timeout", deadline  # not started by the deadline
            continue
        # README Conditions: decided once every dependency is over; a skipped
        # call's answer is absent in a condition
        answers = {d: results[d].answer for d in deps if not results[d].skipped}
        if (any(results[d].skipped for d in needs_of(c, names)) or
                ("when" in c and not cond_uses_item(c) and not cond_holds(c["when"], answers, None, request))):
            r.skipped, r.end = True, start
            if "skip_value" in c and into_of(c) is None:
                r.value, r.has_value = c["skip_value"], True
            continue
        backend = backends[c["backend"]]
        if "batch" in c:
            batch_call(c, r, results, answers, backend, timeout_of(c), start, deadline, behave)
            continue
        if "foreach" not in c:
            bad = render_check(c, answers, None)
            if bad:
                r.code, r.end = bad, start
                continue
            o = exchange(behave(n, None, None), backend, timeout_of(c), start, deadline)
            r.end, r.status = o.end, o.status
            if o.ok:
                r.answer = o.value
                good, v = shape(c, o.value)
                if good:
                    r.value, r.has_value = v, True
                else:
                    r.code = "missing_target"
            else:
                r.code = o.code
            r.raw = (r.code is None and n not in read and group_mode and
                     not any(k in c for k in ("target", "allow", "deny", "rename")))
            continue
        # foreach: README "foreach" and "Answers"
        src, _, path = c["foreach"].partition(".")
        items = jpath_get(results[src].answer, path) if path else results[src].answer
        if items is _ABSENT or items is None:
            r.code, r.end = "missing_value", start
            continue
        if not isinstance(items, list):
            r.code, r.end = "invalid_value", start
            continue
        if len(items) > c.get("foreach_max", DEFAULT_FOREACH_MAX):
            r.code, r.end = "too_many_items", start
            continue
        conc = c.get("foreach_concurrency", DEFAULT_FOREACH_CONCURRENCY)
        slots = [start] * conc
        fb = c.get("fallback", None)
        values, outs, elems = [], [], []
        per_item = cond_uses_item(c)
        for k, it in enumerate(items):
            slots.sort()
            t0 = slots[0]
            if t0 < deadline and per_item and not cond_holds(c["when"], answers, it, request):
                # README Conditions, foreach: not sent, not failed; left out
                # of the array or skip_value in its slot
                elems.append(("skipped", None))
                outs.append(None)
                if "skip_value" in c:
                    values.append(c["skip_value"])
                continue
            if t0 < deadline and "into" in c and not isinstance(it, dict):
                # README Enrichment: not sent, invalid_value
                o = Outcome(t0, "invalid_value")
                outs.append(o)
                elems.append(("failed", None))
                values.append(fb)
                continue
            bad = render_check(c, answers, it)
            if bad:
                o = Outcome(t0, bad)
            elif t0 >= deadline:
                o = Outcome(deadline, "timeout")
            else:
                o = exchange(behave(n, k, it), backend, timeout_of(c), t0, deadline)
                if o.ok:
                    good, v = shape(c, o.value)
                    if good:
                        o.value = v
                    else:
                        o = Outcome(o.end, "missing_target", o.status)
            slots[0] = o.end
            outs.append(o)
            elems.append(("ok", o.value) if o.ok else ("failed", None))
            values.append(o.value if o.ok else fb)
        # README Templates: the answers in element order, null where failed or skipped
        r.answer = [o.value if o is not None and o.ok else None for o in outs]
        r.value, r.has_value, r.elems = values, True, elems
        r.end = max([o.end for o in outs if o is not None], default=start)
        bad = [(o.end, k, o) for k, o in enumerate(outs) if o is not None and not o.ok]
        if bad:
            r.failed = [k for _, k, _ in bad]
            first = min(e for e, _, _ in bad)
            firsts = [o for e, _, o in bad if e == first]
            if len({(o.code, o.status) for o in firsts}) > 1:
                raise Ambiguous(f"call {n}: elements failed at once with {[(o.code, o.status) for o in firsts]}")
            r.code, r.status = firsts[0].code, firsts[0].status
            r.end_first_fail = first
        else:
            r.status = None

    exp = Expect()
    # a required call that failed decides, the first one in time (README
    # "A required call failed: gatherd answers at once")
    fatal = []
    for n in names:
        c, r = by_name[n], results[n]
        if c.get("required") and r.code is not None:
            fatal.append((getattr(r, "end_first_fail", r.end), n))
    if fatal:
        fatal.sort()
        if len(fatal) > 1 and fatal[0][0] == fatal[1][0]:
            raise Ambiguous(f"required calls {fatal[0][1]} and {fatal[1][1]} fail at the same time")
        t, n = fatal[0]
        # a call that failed before it, in time, may fail earlier than every
        # required one: it does not change the answer
        r = results[n]
        exp.status = REQUIRED_STATUS.get(r.code, 502)
        err = {"code": r.code, "call": n}
        if r.status is not None:
            err["status"] = r.status
        exp.body = {"error": err}
        exp.completed = None
        exp.retry_after = r.code in RETRY_AFTER
        exp.timing = [(m, r.code if m == n else "*") for m in names]
        return exp

    complete = all(results[n].code is None for n in names)
    errors = {}
    doc = {}
    for n in names:
        # README Enrichment: the source's shaping applies to the enriched answer
        into = [c for c in calls if into_of(c) is not None and source_of(c) == n]
        r = results[n]
        if into and r.code is None and not r.skipped:
            good, v = shape(by_name[n], enrich(r.answer, into, results))
            if not good:
                raise Ambiguous(f"{n}: its target went away under an enrichment")
            r.value = v
    for n in names:
        c, r = by_name[n], results[n]
        if r.code is not None:
            if route.get("errors"):
                e = {"code": r.code}
                if r.status is not None:
                    e["status"] = r.status
                if r.failed is not None:
                    e["failed"] = r.failed
                if getattr(r, "missing", None):
                    e["missing"] = r.missing
                errors[n] = e
            if "foreach" in c or "batch" in c:
                if not r.has_value:
                    continue  # it could not run at all: its key is left out
                v = r.value
            elif "fallback" in c:
                v = c["fallback"]
            else:
                continue
        elif r.skipped and not r.has_value:
            continue
        else:
            v = r.value
        if into_of(c) is not None:
            continue  # README Enrichment: no key of its own
        group = c.get("group", n)
        if group_mode or not isinstance(v, dict):
            doc[group] = v
        else:
            for k, x in v.items():
                doc[k] = x
        if r.code is None and r.raw:
            exp.raw_texts.append((n, behave(n, None, None)))
        elif r.code is None:
            exp.parsed_calls.append(n)
    if errors:
        doc["_errors"] = errors
    exp.body = doc
    exp.completed = complete
    exp.timing = [(n, "skipped" if results[n].skipped else results[n].code) for n in names]
    return exp
