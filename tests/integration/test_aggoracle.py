#!/usr/bin/env python3
"""The aggregate oracle: gatherd's aggregate answers against a reference
model of the README (aggmodel.py), over a generated matrix of routes.

Every cell of the matrix is one route of one daemon configuration: a call
under test "c" between two plain calls "a" and "z" (whose keys collide with
c's in "merge" mode), optionally read by a later call "r" through a
template (so c's answer is parsed, not copied) or made to wait for it with
"after" (c's answer is still copied unparsed), with every combination of
required/optional, fallback (none, an object, null), shaping (target,
allow, deny, rename, a target the answer lacks), merge mode, errors on/off,
and what the backend does (answers, 204, 4xx/5xx, invalid JSON, too large,
cut short before or after its head, not HTTP, refuses, too slow for the
call's timeout or the route's deadline, its circuit open). foreach cells do
the same per element (elements succeeding and failing, an empty array,
foreach_max, a failed or unusable source). Conditions ("when") and
enrichment ("into") have matrices of their own, sampled from their products
(seeded, so every run has the same cells) to keep the run short: every form
of condition against a gate call that answers, fails or is skipped, with
the call's outcome, skip_value, fallback, required, merge mode, errors and
a dependent (reading it, after it, or conditioned on it); foreach calls
with per-element and whole-call conditions, into (one or two calls, source
shaping, elements that are not objects), and the usual element failures.
Each answer (status, the document compared exactly, X-Gateway-Completed,
Server-Timing's entries and their desc, the error JSON of a required call,
Retry-After) must be the model's.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_aggoracle.py [NAME-SUBSTRING ...]
GW_ORACLE_CELLS=SUBSTRING runs only the cells whose description holds it.
"""

import http.client
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, eq, main  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

import aggmodel as M  # noqa: E402

ms = tp.ms
atest = tp.ptest
Stub = tp.Stub

CLIENTS = 24                  # requests in flight at once
CALL_TIMEOUT_MS = ms(150)     # the timeout_ms of a call whose backend is too slow
DEADLINE_MS = ms(900)         # the deadline_ms of a route whose call outlives it
SLOW_MS = ms(8000)            # how long a "slow" backend waits (past both)
RUN_LIMIT_S = 120             # the whole matrix, a bound for a hung daemon


def pq(text):
    return urllib.parse.quote(text, safe="")


# --- what the backends do: one catalog for the model and for the stub --------------------------

# c's answer: white space around it (trimmed when copied), a decimal whose
# text only an unparsed copy keeps, keys that collide with a's and z's
ANSWER_TEXT = (' \n{"f": "v1", "id": 5, "name": "n", "price": 2.50, "internal": {"x": 1}, '
               '"data": {"user": {"id": 5, "name": "u"}}, "items": [{"id": 1, "secret": "s"}, {"id": 2}], '
               '"address": {"city": "c", "zip": "z"}, "ak": "c", "shared": "c"} \n')
BIG = 200  # a body over the "small" backend's max_response_bytes (100)
BIG_TEXT = '{"data":"' + "x" * (BIG - 11) + '"}'  # what the stub's size=200 sends

# outcome -> (model Behaviour, backend, stub query)
OUTCOMES = {
    "ok": (M.answer(200, ANSWER_TEXT), "s", "body=" + pq(ANSWER_TEXT)),
    "ok204": (M.answer(204, ""), "s", "status=204"),
    "bad_status_404": (M.answer(404, "{}"), "s", "status=404"),
    "bad_status_503": (M.answer(503, "{}"), "s", "status=503"),
    "bad_json": (M.answer(200, '{"broken": '), "s", "bad_json=1"),
    "timeout": (M.slow(SLOW_MS, M.answer(200, ANSWER_TEXT)), "s", f"delay={SLOW_MS}&body=" + pq(ANSWER_TEXT)),
    "deadline": (M.slow(SLOW_MS, M.answer(200, ANSWER_TEXT)), "s", f"delay={SLOW_MS}&body=" + pq(ANSWER_TEXT)),
    "connect_failed": (M.refused(), "dead", ""),
    "truncated_body": (M.cut(200), "s", "size=100&truncate=10"),
    "truncated_head": (M.close(), "s", "close=before_headers"),
    "too_large": (M.answer(200, BIG_TEXT), "small", f"size={BIG}"),
    "bad_response": (M.garbage(), "s", "garbage=1"),
    "circuit_open": (M.breaker_open(), "open", ""),
}

SHAPINGS = {
    "none": {},
    "target": {"target": "data.user"},
    "target_array": {"target": "items"},
    "target_missing": {"target": "data.nope"},
    "allow": {"allow": ["id", "address.city", "nope", "ak"]},
    "deny": {"deny": ["internal", "items[0].secret", "nope"]},
    "rename": {"rename": {"name": "full_name", "f": "g"}},
    "target_rename": {"target": "data.user", "rename": {"id": "uid"}},
}

NO_FALLBACK = object()
FALLBACKS = {"nofb": NO_FALLBACK, "fbobj": {"fb": 1, "ak": "fb"}, "fbnull": None}

A_TEXT = '{"shared": "a", "ak": 1, "cv": "a"}'    # cv: c's group key, an earlier call's key
Z_TEXT = '{"shared": "z", "zk": 2, "_errors": "z"}'
R_TEXT = '{"rv": 1}'


def fixed(text):
    return "/x?body=" + pq(text)


# --- cells ---------------------------------------------------------------------------------------

# what every request of a cell sends: conditions read it (query values and headers are strings)
REQ_QUERY = {"n": "5", "include": "orders"}
REQ_HEADERS = {"X-Flag": "on"}
REQ_PARAMS = {"pid": "7"}


class Cell:
    def __init__(self, desc, route, behaviours, param=False):
        self.desc = desc
        self.route = route            # the route's configuration, path set later
        self.behaviours = behaviours  # (call, element index or None) -> Behaviour (or a function of the element)
        self.path = None              # the route's path
        self.url = None               # what the client asks for
        self.param = param            # the route has the path parameter {pid}

    def behave(self, name, k, item):
        b = self.behaviours[name]
        return b(k, item) if callable(b) else b


def plain_cells():
    out = []
    for outcome, (beh, backend, query) in OUTCOMES.items():
        if outcome in ("ok", "ok204"):
            shapings = list(SHAPINGS)
        elif outcome == "deadline":
            shapings = ["none"]
        else:
            shapings = ["none", "allow"]  # unparsed or parsed; the rest of shaping never sees a failure
        # how a later call r depends on c: not at all, reading a text value or an object
        # (invalid_value), or waiting for it with "after" (c is not read: copied unparsed)
        reads = (None, "f", "internal", "after") if outcome in ("ok", "ok204") else (None, "f", "after")
        for shaping, required, fb, merge, read, errors in itertools.product(
                shapings, (False, True), FALLBACKS, ("group", "merge"), reads, (False, True)):
            if required and fb == "fbnull":
                continue
            c = {"name": "c", "backend": backend, "path": "/c?" + query, "group": "cv"}
            c.update(SHAPINGS[shaping])
            if required:
                c["required"] = True
            if FALLBACKS[fb] is not NO_FALLBACK:
                c["fallback"] = FALLBACKS[fb]
            if outcome == "timeout":
                c["timeout_ms"] = CALL_TIMEOUT_MS
            calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)}, c,
                     {"name": "z", "backend": "s", "path": fixed(Z_TEXT)}]
            behaviours = {"a": M.answer(200, A_TEXT), "c": beh, "z": M.answer(200, Z_TEXT)}
            if read == "after":
                calls.append({"name": "r", "backend": "s", "path": fixed(R_TEXT), "after": ["c"]})
                behaviours["r"] = M.answer(200, R_TEXT)
            elif read:
                calls.append({"name": "r", "backend": "s", "path": "/r?v={c.%s}&body=%s" % (read, pq(R_TEXT))})
                behaviours["r"] = M.answer(200, R_TEXT)
            route = {"calls": calls, "merge": merge}
            if errors:
                route["errors"] = True
            if outcome == "deadline":
                route["deadline_ms"] = DEADLINE_MS
            desc = (f"{outcome} {shaping} {'required' if required else 'optional'} {fb} {merge} "
                    f"{'read:' + read if read else 'unread'} {'errors' if errors else 'noerrors'}")
            out.append(Cell(desc, route, behaviours))
    # retries change nothing in the answer: the last try's failure is the call's
    for outcome, required, fb, merge, read, errors in itertools.product(
            ("ok", "bad_status_503", "bad_json", "truncated_head", "connect_failed"), (False, True),
            ("nofb", "fbobj"), ("group", "merge"), (None, "f"), (False, True)):
        beh, backend, query = OUTCOMES[outcome]
        c = {"name": "c", "backend": "retry_dead" if backend == "dead" else "retry", "path": "/c?" + query,
             "group": "cv"}
        if required:
            c["required"] = True
        if FALLBACKS[fb] is not NO_FALLBACK:
            c["fallback"] = FALLBACKS[fb]
        calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)}, c]
        behaviours = {"a": M.answer(200, A_TEXT), "c": beh}
        if read:
            calls.append({"name": "r", "backend": "s", "path": "/r?v={c.f}&body=" + pq(R_TEXT)})
            behaviours["r"] = M.answer(200, R_TEXT)
        route = {"calls": calls, "merge": merge}
        if errors:
            route["errors"] = True
        desc = (f"retried:{outcome} none {'required' if required else 'optional'} {fb} {merge} "
                f"{'read:f' if read else 'unread'} {'errors' if errors else 'noerrors'}")
        out.append(Cell(desc, route, behaviours))
    return out


def element(k, st=200, delay=0, body=None):
    """A foreach element: the stub's status, delay and body for it."""
    if body is None:
        body = json.dumps({"id": k, "name": f"e{k}", "internal": 1, "data": {"user": {"id": k}}, "ak": "e"})
    return {"st": st, "d": delay, "b": body}


def element_behaviour(k, item):
    """What the stub does with the element's request (its status, delay and
    body controls)."""
    b = M.answer(item["st"], "" if item["st"] == 204 else item["b"])
    return M.slow(item["d"], b) if item["d"] else b


FOREACH_SCENARIOS = {
    # name -> (elements, source status, foreach path, call options)
    "all_ok": ([element(0), element(1), element(2)], 200, "src.list", {}),
    "one_bad_status": ([element(0), element(1, st=503, body="x"), element(2)], 200, "src.list", {}),
    "all_bad_json": ([element(k, body='{"broken": ') for k in range(3)], 200, "src.list", {}),
    "one_timeout": ([element(0), element(1, delay=SLOW_MS), element(2)], 200, "src.list",
                    {"timeout_ms": CALL_TIMEOUT_MS}),
    "one_204": ([element(0), element(1, st=204, body="null"), element(2)], 200, "src.list", {}),
    "empty": ([], 200, "src.list", {}),
    "too_many": ([element(0), element(1), element(2)], 200, "src.list", {"foreach_max": 2}),
    "at_max": ([element(0), element(1)], 200, "src.list", {"foreach_max": 2, "foreach_concurrency": 1}),
    "source_failed": ([element(0)], 503, "src.list", {}),
    "root": ([element(0), element(1)], 200, "src", {}),  # the answer itself is the array
    # the route's deadline: a running element fails, one not started yet too
    "deadline": ([element(0), element(1, delay=SLOW_MS), element(2)], 200, "src.list", {}),
    "deadline_serial": ([element(0), element(1, delay=SLOW_MS), element(2)], 200, "src.list",
                        {"foreach_concurrency": 1}),
    "absent": ([element(0)], 200, "src.nolist", {}),
    "not_array": ([element(0)], 200, "src.notlist", {}),
}
FOREACH_SHAPINGS = {"none": {}, "target": {"target": "data.user"}, "deny": {"deny": ["internal"]}}


def foreach_cells():
    out = []
    for scen, (items, src_status, fpath, opts) in FOREACH_SCENARIOS.items():
        src_text = json.dumps(items if fpath == "src" else {"list": items, "notlist": 5})
        shapings = ["none"] if scen.startswith("deadline") else list(FOREACH_SHAPINGS)
        for shaping, required, fb, merge, errors in itertools.product(
                shapings, (False, True), ("nofb", "fbobj"), ("group", "merge"), (False, True)):
            c = {"name": "c", "backend": "s", "path": "/e?status={item.st}&delay={item.d}&body={item.b}",
                 "foreach": fpath, "group": "cv"}
            c.update(FOREACH_SHAPINGS[shaping])
            c.update(opts)
            if required:
                c["required"] = True
            if FALLBACKS[fb] is not NO_FALLBACK:
                c["fallback"] = FALLBACKS[fb]
            src_query = "body=" + pq(src_text) + ("" if src_status == 200 else f"&status={src_status}")
            calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)},
                     {"name": "src", "backend": "s", "path": "/src?" + src_query}, c,
                     {"name": "z", "backend": "s", "path": fixed(Z_TEXT)}]
            behaviours = {"a": M.answer(200, A_TEXT), "src": M.answer(src_status, src_text),
                          "c": element_behaviour, "z": M.answer(200, Z_TEXT)}
            route = {"calls": calls, "merge": merge}
            if errors:
                route["errors"] = True
            if scen.startswith("deadline"):
                route["deadline_ms"] = DEADLINE_MS
            desc = (f"foreach:{scen} {shaping} {'required' if required else 'optional'} {fb} {merge} "
                    f"{'errors' if errors else 'noerrors'}")
            out.append(Cell(desc, route, behaviours))
    return out


# --- conditions ("when") ---------------------------------------------------------------------------

# the gate's answer: what conditions read
G_TEXT = json.dumps({"id": 5, "tier": "gold", "age": 42, "score": 2.5, "vip": True, "none": None,
                     "address": {"city": "Paris", "zip": None}, "tags": ["a", "b"]})

# every form of condition; which hold depends on the gate and the request (REQ_*)
CONDS = {
    "in": {"value": "{g.tier}", "in": ["silver", "gold"]},
    "equals_false": {"value": "{g.tier}", "equals": "silver"},
    "query_string": {"value": "{query.n}", "equals": "5"},
    "query_number": {"value": "{query.n}", "equals": 5},
    "query_absent_null": {"value": "{query.nope}", "equals": None},
    "int_real": {"value": "{g.age}", "equals": 42.0},
    "real_in": {"value": "{g.score}", "in": ["2.5", 2.5]},
    "bool_number": {"value": "{g.vip}", "equals": 1},
    "exists": {"exists": "{g.address.city}"},
    "exists_null": {"exists": "{g.address.zip}"},
    "not_exists": {"not": {"exists": "{g.nope.deeper}"}},
    "null_equals_null": {"value": "{g.none}", "equals": None},
    "object": {"value": "{g.address}", "equals": {"zip": None, "city": "Paris"}},
    "array_order": {"value": "{g.tags}", "equals": ["b", "a"]},
    "text": {"value": "{g.tier}/{query.n}", "equals": "gold/5"},
    "text_null": {"exists": "x{g.none}"},
    "header": {"value": "{header.x-flag}", "in": ["on"]},
    "param": {"value": "{pid}", "equals": "7"},
    "all": {"all": [{"exists": "{g.id}"}, {"value": "{query.include}", "equals": "orders"}]},
    "any_false": {"any": [{"value": "{g.tier}", "equals": "x"}, {"exists": "{g.nope}"}]},
    "nested": {"not": {"any": [{"all": [{"exists": "{g.id}"}, {"not": {"exists": "{query.include}"}}]}]}},
}
GATES = ("ok", "failed", "skipped")
SKIP_VALUES = {"nosv": NO_FALLBACK, "svobj": {"sk": 1, "ak": "skip"}, "svnull": None}
DEPENDENTS = (None, "tpl", "tpl_sv", "after", "else", "condc")
WHEN_OUTCOMES = ("ok", "bad_status_503", "timeout")


def when_cells(per=8, seed=1):
    """For each condition and gate state, per cells sampled from the product
    of the other dimensions."""
    rng = random.Random(seed)
    dims = list(itertools.product(WHEN_OUTCOMES, (False, True), ("nofb", "fbobj"), SKIP_VALUES,
                                  ("group", "merge"), (False, True), DEPENDENTS))
    out = []
    for cname, gate in itertools.product(CONDS, GATES):
        for outcome, required, fb, sv, merge, errors, dep in rng.sample(dims, per):
            beh, backend, query = OUTCOMES[outcome]
            g = {"name": "g", "backend": "s", "path": fixed(G_TEXT)}
            gbeh = M.answer(200, G_TEXT)
            if gate == "failed":
                g["path"] = "/g?status=503"
                gbeh = M.answer(503, "{}")
            elif gate == "skipped":
                g["when"] = {"exists": "{query.never}"}
            c = {"name": "c", "backend": backend, "path": "/c?" + query, "group": "cv", "when": CONDS[cname]}
            if required:
                c["required"] = True
            if FALLBACKS[fb] is not NO_FALLBACK:
                c["fallback"] = FALLBACKS[fb]
            if SKIP_VALUES[sv] is not NO_FALLBACK:
                c["skip_value"] = SKIP_VALUES[sv]
            if outcome == "timeout":
                c["timeout_ms"] = CALL_TIMEOUT_MS
            calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)}, g, c,
                     {"name": "z", "backend": "s", "path": fixed(Z_TEXT)}]
            behaviours = {"a": M.answer(200, A_TEXT), "g": gbeh, "c": beh, "z": M.answer(200, Z_TEXT)}
            r = {"name": "r", "backend": "s", "path": fixed(R_TEXT)}
            if dep in ("tpl", "tpl_sv"):
                r["path"] = "/r?v={c.f}&body=" + pq(R_TEXT)
                if dep == "tpl_sv":
                    r["skip_value"] = "rs"
            elif dep == "after":
                r["after"] = ["c"]
            elif dep == "else":
                r["when"] = {"not": {"exists": "{c}"}}
            elif dep == "condc":
                r["when"] = {"value": "{c.f}", "equals": "v1"}
            if dep:
                calls.append(r)
                behaviours["r"] = M.answer(200, R_TEXT)
            route = {"calls": calls, "merge": merge}
            if errors:
                route["errors"] = True
            desc = (f"when:{cname} gate:{gate} {outcome} {'required' if required else 'optional'} {fb} {sv} "
                    f"{merge} {'errors' if errors else 'noerrors'} dep:{dep}")
            out.append(Cell(desc, route, behaviours, param=cname == "param"))
    return out


# --- foreach with conditions, and enrichment ("into") ---------------------------------------------

def kind_element(k, kind, **kw):
    e = element(k, **kw)
    e["k"] = kind
    return e


INTO_SCENARIOS = {
    # name -> (elements, source status, foreach path, call options)
    "mix": ([kind_element(0, "p"), kind_element(1, "x"), kind_element(2, "p", st=503, body="x"),
             kind_element(3, "x"), kind_element(4, "p")], 200, "src.list", {}),
    "all_x": ([kind_element(0, "x"), kind_element(1, "x")], 200, "src.list", {}),
    # 5 and "s" have no k: a condition on {item.k} skips them before into could refuse them
    "not_objects": ([kind_element(0, "p"), 5, "s", kind_element(3, "x")], 200, "src.list", {}),
    "timeout": ([kind_element(0, "p"), kind_element(1, "p", delay=SLOW_MS), kind_element(2, "x")], 200, "src.list",
                {"timeout_ms": CALL_TIMEOUT_MS}),
    "serial": ([kind_element(0, "x"), kind_element(1, "p"), kind_element(2, "x"), kind_element(3, "p", st=404)],
               200, "src.list", {"foreach_concurrency": 1}),
    "empty": ([], 200, "src.list", {}),
    "source_failed": ([kind_element(0, "p")], 503, "src.list", {}),
    "absent": ([kind_element(0, "p")], 200, "src.nolist", {}),
    "too_many": ([kind_element(0, "p"), kind_element(1, "x"), kind_element(2, "p")], 200, "src.list",
                 {"foreach_max": 2}),
}
ITEM_CONDS = {
    "nowhen": None,
    "item": {"value": "{item.k}", "equals": "p"},
    "not_item": {"not": {"value": "{item.k}", "equals": "p"}},
    "whole_true": {"value": "{query.n}", "equals": "5"},
    "whole_false": {"value": "{query.n}", "equals": 5},
    "mixed": {"all": [{"exists": "{src.meta}"}, {"value": "{item.k}", "in": ["p", "q"]}]},
}
INTO_MODES = ("nointo", "into", "into2")
SRC_SHAPINGS = {"none": {}, "target": {"target": "list"}, "deny": {"deny": ["meta"]},
                "allow": {"allow": ["list", "meta"]}}
ELEM_SHAPINGS = {"none": {}, "target": {"target": "data.user"}}


def into_cells(per=8, seed=2):
    rng = random.Random(seed)
    dims = list(itertools.product(INTO_MODES, SKIP_VALUES, ("nofb", "fbobj"), (False, True), ("group", "merge"),
                                  (False, True), SRC_SHAPINGS, ELEM_SHAPINGS))
    out = []
    for scen, wname in itertools.product(INTO_SCENARIOS, ITEM_CONDS):
        items, src_status, fpath, opts = INTO_SCENARIOS[scen]
        src_text = json.dumps({"list": items, "notlist": 5, "meta": "m"})
        picked = 0
        for mode, sv, fb, required, merge, errors, sshape, eshape in rng.sample(dims, len(dims)):
            if picked == per:
                break
            if SKIP_VALUES[sv] is not NO_FALLBACK and ITEM_CONDS[wname] is None:
                continue  # refused at load: the call is never skipped
            picked += 1
            c = {"name": "c", "backend": "s", "path": "/e?status={item.st}&delay={item.d}&body={item.b}",
                 "foreach": fpath}
            c.update(ELEM_SHAPINGS[eshape])
            c.update(opts)
            if ITEM_CONDS[wname] is not None:
                c["when"] = ITEM_CONDS[wname]
            if mode == "nointo":
                c["group"] = "cv"
            else:
                c["into"] = "got"
            if required:
                c["required"] = True
            if FALLBACKS[fb] is not NO_FALLBACK:
                c["fallback"] = FALLBACKS[fb]
            if SKIP_VALUES[sv] is not NO_FALLBACK:
                c["skip_value"] = SKIP_VALUES[sv]
            src_query = "body=" + pq(src_text) + ("" if src_status == 200 else f"&status={src_status}")
            src = {"name": "src", "backend": "s", "path": "/src?" + src_query}
            src.update(SRC_SHAPINGS[sshape])
            calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)}, src, c,
                     {"name": "z", "backend": "s", "path": fixed(Z_TEXT)}]
            behaviours = {"a": M.answer(200, A_TEXT), "src": M.answer(src_status, src_text),
                          "c": element_behaviour, "z": M.answer(200, Z_TEXT)}
            if mode == "into2":
                # a second call enriching the same elements under another key, listed first
                calls.insert(2, {"name": "c2", "backend": "s", "path": "/e2?body={item.b}", "foreach": fpath,
                                 "into": "stock", "target": "name", "fallback": "nostock"})
                behaviours["c2"] = lambda k, item: M.answer(200, item["b"])
            route = {"calls": calls, "merge": merge}
            if errors:
                route["errors"] = True
            desc = (f"foreach-when:{scen} {wname} {mode} {sv} {fb} {'required' if required else 'optional'} "
                    f"{merge} {'errors' if errors else 'noerrors'} src:{sshape} elem:{eshape}")
            out.append(Cell(desc, route, behaviours))
    return out


# --- batched calls ("batch") --------------------------------------------------------------------

def stub_id(t):
    """How the stub writes a value it was sent: a number when a plain integer."""
    return int(t) if re.fullmatch(r"0|[1-9][0-9]{0,17}", t) else t


def batch_answer(values, omit=(), dup=False, reverse=False):
    """The stub's batch= answer (tests/stub/README.md) for the values of one request."""
    asked = ",".join(values)
    kept = [v for v in values if v not in omit]
    if reverse:
        kept.reverse()
    out = [{"id": stub_id(v), "name": f"item {v}", "asked": asked} for v in kept]
    if dup:
        out += [{"id": stub_id(v), "name": f"dup {v}", "asked": asked} for v in kept]
    return json.dumps(out)


def batch_behaviour(st):
    """What the stub does with one request of values, given the cell's stub controls."""
    def beh(name, ci, values):
        if st.get("bad_json"):
            b = M.answer(200, '{"broken": ')
        elif any(v in st.get("fail", ()) for v in values) or st.get("status", 200) != 200:
            b = M.answer(st.get("status", 503) if st.get("status", 200) != 200 else 503, "{}")
        else:
            b = M.answer(200, batch_answer(values, st.get("omit", ()), st.get("dup"), st.get("reverse")))
        return M.slow(st["delay"], b) if st.get("delay") else b
    return beh


def batch_query(st):
    q = ["batch=ids"]
    if st.get("omit"):
        q.append("batch_omit=" + pq(",".join(st["omit"])))
    if st.get("fail"):
        q.append("batch_fail=" + pq(",".join(st["fail"])))
    for k in ("dup", "reverse"):
        if st.get(k):
            q.append(f"batch_{k}=1")
    if st.get("bad_json"):
        q.append("bad_json=1")
    if st.get("status"):
        q.append(f"status={st['status']}")
    if st.get("delay"):
        q.append(f"delay={st['delay']}")
    return "&".join(q)


def bitem(pid, **kw):
    e = {"pid": pid, "q": 1}
    e.update(kw)
    return e


MIX = [bitem(7), bitem(9), bitem(7), bitem("12"), bitem(3), bitem(12), bitem(4.0), bitem("x y")]
BATCH_SCENARIOS = {
    # name -> (elements, source status, array path, batch options, stub controls, call options)
    "mix": (MIX, 200, "list", {"max": 2}, {}, {}),
    "one_chunk": (MIX, 200, "list", {}, {"omit": ["9"]}, {}),
    "missing": (MIX, 200, "list", {"max": 3}, {"omit": ["9", "12"]}, {}),
    "chunk_fails": (MIX, 200, "list", {"max": 2}, {"fail": ["3"]}, {}),
    "chunk_fails_missing": (MIX, 200, "list", {"max": 2}, {"fail": ["7"], "omit": ["4"]}, {}),
    "all_503": (MIX, 200, "list", {"max": 3}, {"status": 503}, {}),
    "bad_json": (MIX, 200, "list", {}, {"bad_json": True}, {}),
    "dup_reverse": (MIX, 200, "list", {"max": 4}, {"dup": True, "reverse": True}, {}),
    "not_sendable": ([bitem(1), bitem(None), {"q": 2}, bitem(True), 5, bitem({"a": 1}), bitem(""), bitem(2),
                      bitem([1])], 200, "list", {}, {}, {}),
    "not_sendable_only": ([bitem(None), {"q": 2}], 200, "list", {}, {}, {}),
    "empty": ([], 200, "list", {}, {}, {}),
    "too_many": (MIX, 200, "list", {"max_items": 3}, {}, {}),
    "source_failed": (MIX, 503, "list", {}, {}, {}),
    "absent": (MIX, 200, "nolist", {}, {}, {}),
    "not_array": (MIX, 200, "notlist", {}, {}, {}),
    "target_missing": (MIX, 200, "list", {"max": 4}, {}, {"target": "nope"}),
    "target_object": (MIX, 200, "list", {"max": 4}, {}, {"target": "[0]"}),
    "timeout": (MIX, 200, "list", {"max": 4}, {"delay": SLOW_MS}, {"timeout_ms": CALL_TIMEOUT_MS}),
    "root_values": ([7, 9, 7, "x"], 200, "", {"max": 2}, {}, {}),
}
BATCH_WHEN = {"nowhen": None, "holds": {"value": "{query.n}", "equals": "5"},
              "skips": {"value": "{query.n}", "equals": 5}}
BATCH_SHAPINGS = {"none": {}, "allow": {"allow": ["name"]}, "deny": {"deny": ["asked"]},
                  "rename": {"rename": {"name": "title"}}}


def batch_cells(per=14, seed=3):
    rng = random.Random(seed)
    dims = list(itertools.product(("nointo", "into"), BATCH_SHAPINGS, ("nofb", "fbobj"), (False, True),
                                  ("group", "merge"), (False, True), BATCH_WHEN, SKIP_VALUES, ("none", "deny")))
    out = []
    for scen, (items, src_status, apath, bopts, st, copts) in BATCH_SCENARIOS.items():
        src_text = json.dumps({"list": items, "notlist": 5, "meta": "m"} if apath != "" else items)
        picked = 0
        for mode, shaping, fb, required, merge, errors, wname, sv, sshape in rng.sample(dims, len(dims)):
            if picked == per:
                break
            if SKIP_VALUES[sv] is not NO_FALLBACK and BATCH_WHEN[wname] is None:
                continue  # refused at load: the call is never skipped
            if mode == "into" and apath == "":
                continue  # the elements are numbers: covered by not_sendable
            if sshape == "deny" and apath == "":
                continue
            picked += 1
            b = {"from": "src" + ("." + apath if apath else "") + "[*]" + (".pid" if apath else ""),
                 "param": "ids"}
            b.update(bopts)
            c = {"name": "c", "backend": "s", "path": "/b?" + batch_query(st), "batch": b}
            c.update(BATCH_SHAPINGS[shaping])
            c.update(copts)
            if mode == "into":
                b["into"] = "got"
            else:
                c["group"] = "cv"
            if required:
                c["required"] = True
            if FALLBACKS[fb] is not NO_FALLBACK:
                c["fallback"] = FALLBACKS[fb]
            if BATCH_WHEN[wname] is not None:
                c["when"] = BATCH_WHEN[wname]
            if SKIP_VALUES[sv] is not NO_FALLBACK:
                c["skip_value"] = SKIP_VALUES[sv]
            src_query = "body=" + pq(src_text) + ("" if src_status == 200 else f"&status={src_status}")
            src = {"name": "src", "backend": "s", "path": "/src?" + src_query}
            if sshape == "deny":
                src["deny"] = ["meta"]
            calls = [{"name": "a", "backend": "s", "path": fixed(A_TEXT)}, src, c,
                     {"name": "z", "backend": "s", "path": fixed(Z_TEXT)}]
            beh = batch_behaviour(st)
            behaviours = {"a": M.answer(200, A_TEXT), "src": M.answer(src_status, src_text),
                          "c": lambda ci, values, beh=beh: beh("c", ci, values), "z": M.answer(200, Z_TEXT)}
            route = {"calls": calls, "merge": merge}
            if errors:
                route["errors"] = True
            desc = (f"batch:{scen} {mode} {shaping} {fb} {'required' if required else 'optional'} {merge} "
                    f"{'errors' if errors else 'noerrors'} {wname} {sv} src:{sshape}")
            out.append(Cell(desc, route, behaviours))
    return out


# --- running and comparing -----------------------------------------------------------------------

def backends(stub):
    retry = {"attempts": 2, "backoff_base_ms": 1, "backoff_cap_ms": 5, "statuses": [503],
             "budget_percent": 100, "min_retries": 100000}
    return {
        "s": tp.backend(stub.url),
        "retry": tp.backend(stub.url, retry=retry),
        "retry_dead": tp.backend(f"http://127.0.0.1:{tp.closed_port()}", retry=retry),
        "small": tp.backend(stub.url, max_response_bytes=100),
        "dead": tp.backend(f"http://127.0.0.1:{tp.closed_port()}"),
        # opened by the first call (warm-up) for the rest of the run
        "open": tp.backend(f"http://127.0.0.1:{tp.closed_port()}",
                           circuit_breaker={"consecutive_failures": 1, "open_ms": 600000, "max_open_ms": 600000}),
    }


def fetch_all(d, paths):
    """GET every path with CLIENTS keep-alive connections at once:
    {path: (status, {header: value}, body bytes) or an exception}."""
    results = {}
    work = queue.Queue()
    for p in paths:
        work.put(p)
    end = time.monotonic() + RUN_LIMIT_S

    def run():
        conn = None
        while time.monotonic() < end:
            try:
                p = work.get_nowait()
            except queue.Empty:
                break
            for attempt in (1, 2):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(d.host, d.port, timeout=30)
                    conn.request("GET", p, headers=REQ_HEADERS)
                    r = conn.getresponse()
                    body = r.read()
                    results[p] = (r.status, {k.lower(): v for k, v in r.getheaders()}, body)
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    break
                except (OSError, http.client.HTTPException) as e:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if attempt == 2:
                        results[p] = e
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT_S + 30)
    return results


_TIMING_ENTRY = re.compile(r'^([A-Za-z0-9_-]+);dur=(\d+(?:\.\d+)?)(?:;desc="([^"]*)")?$')


def compare(cell, exp, got):
    """The differences between gatherd's answer and the model's: a list of texts."""
    if isinstance(got, Exception):
        return [f"no answer: {got!r}"]
    status, headers, raw = got
    diffs = []
    if status != exp.status:
        diffs.append(f"status {status}, model {exp.status}")
    if "application/json" not in headers.get("content-type", ""):
        diffs.append(f"Content-Type {headers.get('content-type')!r}")
    want_completed = {True: "true", False: "false", None: None}[exp.completed]
    if headers.get("x-gateway-completed") != want_completed:
        diffs.append(f"X-Gateway-Completed {headers.get('x-gateway-completed')!r}, model {want_completed!r}")
    if exp.retry_after != ("retry-after" in headers):
        diffs.append(f"Retry-After {headers.get('retry-after')!r}, model {'yes' if exp.retry_after else 'none'}")
    elif exp.retry_after and not re.match(r"^[1-9][0-9]*$", headers["retry-after"]):
        diffs.append(f"Retry-After {headers['retry-after']!r} is not a positive number of seconds")
    # Server-Timing: every call in order, then total; desc is the failure code
    entries = []
    for part in (headers.get("server-timing") or "").split(","):
        m = _TIMING_ENTRY.match(part.strip())
        if not m:
            diffs.append(f"Server-Timing entry {part.strip()!r}")
            continue
        entries.append((m.group(1), m.group(3)))
    names = [n for n, _ in exp.timing] + ["total"]
    if [n for n, _ in entries] != names:
        diffs.append(f"Server-Timing names {[n for n, _ in entries]}, model {names}")
    else:
        for (n, desc), (_, want) in zip(entries, exp.timing + [("total", None)]):
            if want != "*" and desc != want:
                diffs.append(f"Server-Timing {n} desc {desc!r}, model {want!r}")
    try:
        doc = json.loads(raw)
    except ValueError:
        return diffs + [f"body is not JSON: {raw[:200]!r}"]
    if exp.status != 200:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            rid = err.pop("request_id", None)
            if rid is None or rid != headers.get("x-request-id"):
                diffs.append(f"error.request_id {rid!r}, X-Request-Id {headers.get('x-request-id')!r}")
        if doc != exp.body:
            diffs.append(f"body {json.dumps(doc, sort_keys=True)}, model {json.dumps(exp.body, sort_keys=True)}")
        return diffs
    # _errors: ms is a duration (any number >= 0); failed is a set of indexes
    errs = doc.get("_errors") if isinstance(doc, dict) else None
    if isinstance(errs, dict) and cell.route.get("errors"):
        for e in errs.values():
            if isinstance(e, dict):
                v = e.pop("ms", None)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    diffs.append(f"_errors ms {v!r}")
                if isinstance(e.get("failed"), list):
                    e["failed"] = sorted(e["failed"])
                if isinstance(e.get("missing"), list):
                    e["missing"] = sorted(e["missing"])
    if doc != exp.body:
        diffs.append(f"body {json.dumps(doc, sort_keys=True)}, model {json.dumps(exp.body, sort_keys=True)}")
    elif cell.route.get("merge", "group") == "group" and list(doc) != list(exp.body):
        diffs.append(f"key order {list(doc)}, model {list(exp.body)} (group mode: the calls' order)")
    text = raw.decode()
    for name, beh in exp.raw_texts:
        if beh.text.strip() not in text:
            diffs.append(f"call {name}'s answer is not copied as the backend wrote it")
    if "c" in exp.parsed_calls and "2.5" in text and "2.50" in text:
        diffs.append("call c's parsed answer is not written compactly (2.50 kept)")
    return diffs


def run_matrix(cells):
    stub = Stub(threads=2)
    bs = backends(stub)
    sel = os.environ.get("GW_ORACLE_CELLS")
    if sel:
        cells = [c for c in cells if sel in c.desc]
    elif gwtest._is_sanitized(gwtest.GATHERD) and not os.environ.get("GW_ORACLE_ALL"):
        # the normal tier runs every cell (gwtest.SMOKE); under the sanitizers,
        # which look for memory errors on the same paths, every second one
        cells = cells[::2]
    expected, skipped = [], 0
    request = M.Request(REQ_QUERY, REQ_HEADERS, REQ_PARAMS)
    query = "&".join(f"{k}={v}" for k, v in REQ_QUERY.items())
    for i, cell in enumerate(cells):
        cell.path = f"/cell/{i}/{{pid}}" if cell.param else f"/cell/{i}"
        cell.url = f"/cell/{i}/{REQ_PARAMS['pid']}?{query}" if cell.param else f"/cell/{i}?{query}"
        try:
            exp = M.aggregate(cell.route, bs, cell.behave, request if cell.param else
                              M.Request(REQ_QUERY, REQ_HEADERS))
        except M.Ambiguous:
            skipped += 1
            continue
        expected.append((cell, exp))
    check(expected, "no cell to run")
    routes = [{"path": "/warm", "calls": [{"name": "w", "backend": "open", "path": "/", "fallback": None}]}]
    for cell, _ in expected:
        r = dict(cell.route)
        r["path"] = cell.path
        routes.append(r)
    d = Daemon(tp.config(bs, routes=routes), workers=2)
    # the "open" backend's breaker opens on its first failure
    warm = fetch_all(d, ["/warm"])["/warm"]
    check(not isinstance(warm, Exception) and warm[0] == 200, f"warm-up: {warm!r}")
    t0 = time.monotonic()
    got = fetch_all(d, [c.url for c, _ in expected])
    took = time.monotonic() - t0
    failures = []
    for cell, exp in expected:
        diffs = compare(cell, exp, got.get(cell.url, TestFailure("not fetched")))
        if diffs:
            failures.append((cell, diffs))
    print(f"# {len(expected)} cells ({skipped} left out as undecided by the README) in {took:.1f} s, "
          f"{len(failures)} disagree with the model")
    for cell, diffs in failures[:40]:
        print(f"#   {cell.path} [{cell.desc}]: {'; '.join(diffs)}")
    # a summary by outcome and shaping, to read the pattern
    by = {}
    for cell, _ in failures:
        key = " ".join(cell.desc.split()[:2 if not cell.desc.startswith(("when:", "foreach-when:", "batch:")) else 1])
        by[key] = by.get(key, 0) + 1
    for key, n in sorted(by.items()):
        print(f"#   {n:4d} x {key}")
    check(not failures, f"{len(failures)} of {len(expected)} cells disagree with the model (listed above)")


@atest
def aggoracle_model_follows_the_readme():
    """The model itself, on the README's own statements (so a wrong model
    cannot pass for a right one)."""
    bs = {"s": {"url": "http://x"}, "small": {"url": "http://x", "max_response_bytes": 10}}

    def run(calls, behaviours, **route):
        r = {"calls": calls}
        r.update(route)
        return M.aggregate(r, bs, lambda n, k, it: behaviours[n](k, it) if callable(behaviours[n])
                           else behaviours[n])

    ok = M.answer(200, '{"id": 1, "name": "n", "x": {"y": 2}}')
    # README: "merge": a later call's key wins, also over an earlier call's group key; a value
    # that is not an object goes under its group key; _errors last
    e = run([{"name": "a", "backend": "s", "path": "/"}, {"name": "b", "backend": "s", "path": "/"},
             {"name": "c", "backend": "s", "path": "/", "fallback": None}],
            {"a": M.answer(200, "[1]"), "b": M.answer(200, '{"a": 2, "_errors": 3}'), "c": M.answer(500, "")},
            merge="merge", errors=True)
    eq(e.body, {"a": 2, "_errors": {"c": {"code": "bad_status", "status": 500}}, "c": None}, "merge mode")
    eq(e.completed, False, "merge mode: completed")
    # README: a required call's failure: 504 for a timeout, status when it answered, not completed
    e = run([{"name": "u", "backend": "s", "path": "/", "required": True, "timeout_ms": 50},
             {"name": "v", "backend": "s", "path": "/{u.id}"}],
            {"u": M.slow(100, ok), "v": ok})
    eq((e.status, e.body, e.completed), (504, {"error": {"code": "timeout", "call": "u"}}, None), "required timeout")
    e = run([{"name": "u", "backend": "s", "path": "/", "required": True}], {"u": M.answer(200, "{")})
    eq(e.body, {"error": {"code": "bad_json", "call": "u", "status": 200}}, "bad_json reports the status 200")
    # README: shaping order target, allow/deny, rename; a 204 is null; too_large; missing_target
    e = run([{"name": "u", "backend": "s", "path": "/", "target": "x", "rename": {"y": "z"}},
             {"name": "n", "backend": "s", "path": "/"},
             {"name": "l", "backend": "small", "path": "/", "fallback": 0},
             {"name": "m", "backend": "s", "path": "/", "target": "nope"}],
            {"u": ok, "n": M.answer(204, ""), "l": ok, "m": ok}, errors=True)
    eq(e.body, {"u": {"z": 2}, "n": None, "l": 0, "_errors": {"l": {"code": "too_large", "status": 200},
                                                           "m": {"code": "missing_target", "status": 200}}},
       "shaping, 204, too_large, missing_target")
    # README: a template reads the answer before shaping; the deadline fails what did not start
    e = run([{"name": "u", "backend": "s", "path": "/", "target": "x"},
             {"name": "v", "backend": "s", "path": "/{u.id}"},
             {"name": "w", "backend": "s", "path": "/{v.id}"}],
            {"u": ok, "v": M.slow(500, ok), "w": ok}, deadline_ms=100, errors=True)
    eq(e.body, {"u": {"y": 2}, "_errors": {"v": {"code": "timeout"}, "w": {"code": "timeout"}}}, "deadline")
    eq(e.timing, [("u", None), ("v", "timeout"), ("w", "timeout")], "Server-Timing desc")
    # README foreach: a failed element gets the fallback in its slot; a call that cannot run is left out
    items = M.answer(200, '{"l": [{"i": 1}, {"i": 2}], "n": 3}')
    e = run([{"name": "s", "backend": "s", "path": "/"},
             {"name": "f", "backend": "s", "path": "/{item.i}", "foreach": "s.l", "fallback": "fb"},
             {"name": "g", "backend": "s", "path": "/{item.i}", "foreach": "s.n", "fallback": "fb"},
             {"name": "h", "backend": "s", "path": "/{item.i}", "foreach": "s.l", "foreach_max": 1}],
            {"s": items, "f": lambda k, it: ok if k == 0 else M.answer(503, ""), "g": ok, "h": ok}, errors=True)
    eq(e.body["f"], [{"id": 1, "name": "n", "x": {"y": 2}}, "fb"], "foreach slots")
    check("g" not in e.body and "h" not in e.body, f"foreach that cannot run is left out: {e.body}")
    eq(e.body["_errors"], {"f": {"code": "bad_status", "status": 503, "failed": [1]},
                           "g": {"code": "invalid_value"}, "h": {"code": "too_many_items"}}, "foreach _errors")
    # README Conditions: a query value is a string; numbers by value; a skipped call is no failure,
    # has no key (or its skip_value), Server-Timing says "skipped", and what needs it is skipped
    req = M.Request({"n": "5"})

    def runq(calls, behaviours, **route):
        r = {"calls": calls}
        r.update(route)
        return M.aggregate(r, bs, lambda n, k, it: behaviours[n](k, it) if callable(behaviours[n])
                           else behaviours[n], req)

    e = runq([{"name": "u", "backend": "s", "path": "/"},
              {"name": "num", "backend": "s", "path": "/", "when": {"value": "{query.n}", "equals": 5},
               "required": True},
              {"name": "str", "backend": "s", "path": "/", "when": {"value": "{query.n}", "equals": "5"}},
              {"name": "real", "backend": "s", "path": "/", "when": {"value": "{u.id}", "in": [1.0]}},
              {"name": "sv", "backend": "s", "path": "/", "when": {"exists": "{u.x.nope}"}, "skip_value": 0},
              {"name": "dep", "backend": "s", "path": "/{num.id}"},
              {"name": "els", "backend": "s", "path": "/", "when": {"not": {"exists": "{num}"}}}],
             {"u": ok, "num": ok, "str": ok, "real": ok, "sv": ok, "dep": ok, "els": ok}, errors=True)
    eq((e.status, e.completed), (200, True), "skipped calls are no failures, required or not")
    eq(sorted(e.body), ["els", "real", "str", "sv", "u"], "skipped calls have no key, or their skip_value")
    eq(e.body["sv"], 0, "skip_value")
    eq(dict(e.timing), {"u": None, "num": "skipped", "str": None, "real": None, "sv": "skipped",
                        "dep": "skipped", "els": None}, "Server-Timing desc")
    # README Conditions: a condition naming a failed call fails with dependency_failed
    e = runq([{"name": "u", "backend": "s", "path": "/"},
              {"name": "v", "backend": "s", "path": "/", "when": {"exists": "{u.id}"}, "fallback": 1}],
             {"u": M.answer(500, ""), "v": ok}, errors=True)
    eq((e.body["v"], e.body["_errors"]["v"]["code"]), (1, "dependency_failed"), "when naming a failed call")
    # README Conditions, foreach: per element, a filter without skip_value; Enrichment: results in the
    # elements, no key of its own, a failed element's fallback, an element that is not an object
    src = M.answer(200, '{"l": [{"i": 1, "k": "p"}, {"i": 2, "k": "x"}, {"i": 3, "k": "p"}, 7]}')
    e = runq([{"name": "s", "backend": "s", "path": "/", "target": "l"},
              {"name": "f", "backend": "s", "path": "/{item.i}", "foreach": "s.l", "target": "name",
               "when": {"value": "{item.k}", "in": ["p"]}},
              {"name": "g", "backend": "s", "path": "/{item.i}", "foreach": "s.l", "into": "got", "target": "name",
               "fallback": "fb"}],
             {"s": src, "f": ok, "g": lambda k, it: M.slow(10, M.answer(503, "")) if k == 1 else ok}, errors=True)
    eq(e.body["f"], ["n", "n"], "skipped elements leave the array")
    eq(e.body["s"], [{"i": 1, "k": "p", "got": "n"}, {"i": 2, "k": "x", "got": "fb"},
                     {"i": 3, "k": "p", "got": "n"}, 7], "into: results and fallbacks in the source's elements")
    check("g" not in e.body, f"an into call has no key: {e.body}")
    eq(e.body["_errors"]["g"], {"code": "invalid_value", "failed": [1, 3]},
       "into: failed elements, the one that is not an object included (and first)")


@atest
def aggoracle_plain_calls():
    run_matrix(plain_cells())


@atest
def aggoracle_foreach_calls():
    run_matrix(foreach_cells())


@atest
def aggoracle_when_calls():
    run_matrix(when_cells())


@atest
def aggoracle_foreach_when_and_into_calls():
    run_matrix(into_cells())


@atest
def aggoracle_batch_calls():
    run_matrix(batch_cells())


if __name__ == "__main__":
    sys.exit(main())
