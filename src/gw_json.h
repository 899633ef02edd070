/*
 * gw_json.h - JSON output for aggregate answers and templates: a compact
 * serializer of jansson values into a gw_tpl_buf_t, and number text.
 *
 * Why not json_dumps(): jansson prints every real with %.17g, so a backend's
 * 9.99 would reach clients as 9.9900000000000002. Here a real is printed as
 * the shortest of %.15g, %.16g and %.17g that reads back as the same double
 * (9.99 stays 9.99, 0.1 + 0.2 stays 0.30000000000000004), and the answer is
 * written straight into a reusable buffer.
 */
#ifndef GW_JSON_H
#define GW_JSON_H

#include "gw_budget.h"
#include "gw_core.h"
#include "gw_template.h"

#include <jansson.h>

/* Writes the shortest round-trip text of d into buf (NUL-terminated);
 * returns its length. jansson never holds NaN or infinities. */
size_t gw_json_real(double d, char buf[32]);

/* Appends v as compact JSON to out (grown as needed; out->limit is not
 * applied). Object members keep their order; strings are escaped as JSON
 * requires (", \, control characters), other UTF-8 is written as is. */
void gw_json_dump(const json_t *v, gw_tpl_buf_t *out);

/* Appends s as a JSON string (quoted and escaped) to out. */
void gw_json_dump_string(const char *s, size_t len, gw_tpl_buf_t *out);

/*
 * Whether the len bytes at s are one JSON value (RFC 8259, with optional
 * white space around it) that jansson would accept with JSON_DECODE_ANY |
 * JSON_ALLOW_NUL: valid UTF-8, surrogate escapes in pairs, integers within
 * int64, reals within double range, at most 2048 levels of nesting. It
 * allocates nothing: aggregate answers that no template reads and no
 * shaping changes are checked with it and copied as they are. *start and
 * *vlen get the value without the white space around it.
 */
bool gw_json_valid(const char *s, size_t len, size_t *start, size_t *vlen);

/*
 * Metering the memory jansson allocates on the calling thread, against a
 * memory budget: a parsed answer can hold ten to a hundred times its text
 * (`[{},{},...]` takes about 300 bytes per 3 characters), so the budget
 * must see the tree, not only the body. While a meter is on, every
 * allocation is counted (its usable size plus the allocator's header) and
 * taken from the budget in steps; when the budget refuses, or *cancel
 * becomes true, the allocation fails and jansson gives up (json_loadb
 * returns NULL). Allocations of other threads, and of this one outside a
 * meter, cost one thread-local test.
 *
 * gw_json_alloc_init() installs the counting allocator (jansson's
 * json_set_alloc_funcs); gw_main calls it before any thread starts. Without
 * it (unit tests, fuzz drivers) a meter counts nothing.
 */
typedef struct {
    gw_budget_t *budget;
    const bool *cancel; /* atomic flag; NULL: never cancelled */
    size_t used;        /* bytes allocated while metering and not freed since */
    size_t held;        /* taken from budget; >= used */
    bool refused;       /* an allocation failed because of the budget */
    bool cancelled;     /* an allocation failed because of *cancel */
} gw_json_meter_t;

void gw_json_alloc_init(void);
/* Starts metering this thread's jansson allocations into m (one meter per
 * thread at a time). */
void gw_json_meter_begin(gw_json_meter_t *m, gw_budget_t *budget, const bool *cancel);
/* Stops it and gives back what was taken beyond m->used: the caller then
 * owes gw_budget_give(budget, m->used) (m->held == m->used) once the
 * values built meanwhile are freed. */
void gw_json_meter_end(gw_json_meter_t *m);

#endif
