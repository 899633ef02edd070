/*
 * gw_agg.c - aggregate routes (see gw_agg.h and README "Aggregate routes").
 *
 * Life of an aggregate request: gw_agg_start() takes a context (from the
 * worker's cache), arms the route's deadline and runs the scheduler. The
 * scheduler starts every call whose dependencies are all done, fails every
 * call with a failed dependency (dependency_failed), and repeats until
 * nothing changes; a foreach call keeps up to foreach_concurrency element
 * exchanges in flight. Each exchange renders its request, takes a pooled
 * or new upstream connection, and reads the response with llhttp into a
 * bounded buffer (the backend's max_response_bytes, its bytes taken from
 * the response memory budget) that jansson parses: on the loop when it is
 * small, else on the thread pool (ajob_t), which also builds and frees
 * large aggregates (build_run, fjob_t), so the loop never stalls long.
 *
 * The request is decided by the first of: a required call failed (answered
 * at once with its error; the rest is cancelled), every call finished (the
 * aggregate is built in the route's order and sent), the deadline passed
 * (unfinished calls fail with "timeout", then as above).
 *
 * Ownership: the context belongs to the client connection's async slot and
 * owns its exchanges; each exchange owns its upstream connection until it
 * ends. Everything ends in agg_free(): running exchanges release their
 * connections as not reusable (never pooled half-read), parsed answers are
 * dropped. Entry points (upstream callbacks, timers) end with
 * agg_progress(), which may free the context, then gw_conn_release(c);
 * nothing is touched after that. Exchange and call endings never answer
 * the client themselves, so no callback chain frees what its caller still
 * uses. A thread pool job owns what it works on until it is back on the
 * worker: an exchange that ends first only marks its job cancelled, and a
 * context whose aggregate is being built is freed when that job is back.
 */
#include "gw_agg.h"
#include "gw_alog.h"
#include "gw_batch.h"
#include "gw_breaker.h"
#include "gw_cond.h"
#include "gw_budget.h"
#include "gw_cache.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_conn.h"
#include "gw_exchange.h"
#include "gw_fetch.h"
#include "gw_fail.h"
#include "gw_http.h"
#include "gw_json.h"
#include "gw_jpath.h"
#include "gw_log.h"
#include "gw_proxy.h"
#include "gw_resp.h"
#include "gw_router.h"
#include "gw_server.h"
#include "gw_template.h"
#include "gw_tpool.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <llhttp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Contexts and exchanges kept per worker for the next requests. */
#define AGG_CACHE_MAX 256
#define XCHG_CACHE_MAX 1024
/* The head of a call's request (target and headers) is at most this long. */
#define HEAD_MAX (64 * 1024)

/*
 * What runs on the worker's loop and what goes to the thread pool
 * (gw_tpool.h), so that no answer stalls the loop for more than a few
 * milliseconds. Measured with jansson 2.14 at -O2 (README "Large answers"):
 * json_loadb parses 4 MB/s at worst ([{},{},...]: a hash table per 3
 * bytes), 15 MB/s for an object of many keys, 20-45 MB/s otherwise;
 * gw_json_valid checks 190 MB/s at worst; dumping, copying (deny) and
 * freeing a tree run at 25-55 MB/s of its text at worst.
 */
#define PARSE_INLINE_MAX (16 * 1024)    /* answers parsed on the loop: under 4 ms at worst */
#define VALID_INLINE_MAX (256 * 1024)   /* pass-through answers checked on the loop: under 2 ms */
#define BUILD_INLINE_PARSED (64 * 1024) /* parsed answer bytes of a request whose aggregate is built and
                                         * freed on the loop: under 3 ms each */
#define BUILD_INLINE_RAW (4u << 20)     /* pass-through bytes copied into an aggregate on the loop */
/* Body buffers kept with cached exchanges: 1024 per worker at most, so
 * 16 MiB; bigger ones are freed. */
#define BODY_CACHE_MAX (16 * 1024)
/* foreach elements started in one turn of the loop: starting one (render,
 * connect) takes up to 50 us, so 1024 at once held the loop 50 ms. */
#define FILL_BATCH 64

typedef enum { CALL_WAITING = 0, CALL_RUNNING, CALL_OK, CALL_FAILED, CALL_SKIPPED } call_state_t;
/* What became of one element of a foreach or batch call (call_rt_t.elem_done). */
enum { ELEM_PENDING = 0, ELEM_OK, ELEM_FAILED, ELEM_SKIPPED };

typedef struct xchg_s xchg_t;

/* The state of one call of one request. */
typedef struct {
    call_state_t state;
    gw_fail_t code;    /* GW_FAIL_NONE, or how it failed; for foreach, the first failed element's */
    int status;        /* the backend's status when it answered, else 0 */
    json_t *answer;    /* parsed answer, templates read it (foreach: array of answers, null where failed) */
    json_t *value;     /* shaped, for the aggregate (foreach: array) */
    uint64_t start_us, end_us;
    /* foreach */
    json_t *items;     /* borrowed from the source call's answer */
    size_t nitems, next_item, running, done_items;
    unsigned char *elem_done; /* per element: ELEM_*, not ELEM_PENDING once it is over */
    bool filling;      /* foreach_fill() is on the stack */
    json_t *failed;    /* indexes of failed elements, or NULL */
    json_t *missing;   /* batch: indexes of elements whose value no answer had (not_found), or NULL */
    gw_batch_plan_t *plan; /* batch: the values and their chunks (x->item is a chunk) */
    bool raw;          /* the answer is kept as checked bytes (in a->raws, or rbuf), not parsed */
    bool hedge_won;    /* a hedge gave the answer (of an element, for foreach): Server-Timing says so */
    size_t raw_off, raw_len;
    char *rbuf;        /* a pass-through answer checked on the thread pool: its body, raw_off/raw_len in it */
    size_t held;       /* gw_budget_responses bytes its answers hold (trees, rbuf), given back with them */
    unsigned char served; /* SERVED_*: how the cache answered it (the most telling of its elements') */
    uint64_t stale_age_ms; /* SERVED_STALE_ERROR: the age of the old answer used */
} call_rt_t;

/* How the cache (gw_cache.h) answered a call, in rising order of note. */
enum { SERVED_BACKEND = 0, SERVED_COALESCED, SERVED_HIT, SERVED_STALE, SERVED_STALE_ERROR };

typedef struct gw_agg_s agg_t;
typedef struct ajob_s ajob_t;

/* One HTTP exchange with a backend: a call, or one element of a foreach call. */
struct xchg_s {
    gw_xchg_t ex;         /* the upstream exchange (gw_exchange.h): connection, tries, retries, status */
    agg_t *a;
    size_t call;
    size_t item;          /* element index of a foreach call, chunk index of a batch call */
    gw_tpl_buf_t req;     /* the request head, kept for a retry */
    gw_tpl_buf_t obody;   /* the request body rendered from a JSON template */
    bool has_obody;
    size_t out_len;       /* the request body's length */
    char *body;           /* the response body */
    size_t blen, bcap;
    size_t limit;         /* the backend's max_response_bytes */
    bool over_budget;     /* the response budget refused room for the body */
    size_t bheld;         /* bytes of body's capacity taken from gw_budget_responses */
    ajob_t *job;          /* its answer, being parsed on the thread pool */
    json_t *shaped;       /* what the pool shaped the answer into, for xchg_end() */
    gw_cache_waiter_t *waiter; /* waiting for the cache's request of a cached or coalesced call */
    bool lead;            /* that request is the one its lookup started (a miss, not coalesced) */
    xchg_t *next, *prev;  /* in the context's running list, or the cache */
};

struct gw_agg_s {
    gw_conn_t *c;
    gw_worker_t *w;
    const gw_route_t *route;
    gw_match_t match;
    struct event *deadline;
    struct event *fill;   /* foreach elements left to start next turn (FILL_BATCH); made on first use */
    uint64_t start_us;
    uint64_t deadline_us; /* when the deadline fires */
    size_t pending;       /* calls not finished */
    int fatal;            /* index + 1 of the required call that failed first, else 0 */
    xchg_t *running;
    call_rt_t calls[GW_TPL_MAX_CALLS];
    json_t *answers[GW_TPL_MAX_CALLS]; /* the template context's view: calls[i].answer when OK */
    gw_tpl_buf_t raws;    /* unparsed answers, back to back, reused */
    gw_tpl_buf_t out;     /* the serialized aggregate, reused */
    gw_tpl_buf_t hdrs;    /* response headers, reused */
    agg_t *next_free;
    size_t parsed, passed; /* answer bytes parsed into trees, and passed through */
    bool complete;        /* the aggregate built has every call (X-Gateway-Completed) */
    int64_t age_ms;       /* the oldest answer the cache gave it (Age), -1: none */
    bool building;        /* the thread pool builds the aggregate (bjob) */
    bool zombie;          /* the request ended meanwhile: freed when bjob is back */
    gw_config_t *cfg;     /* a reference while bjob runs: the route lives in it */
    gw_tjob_t bjob;
};

/* Per-worker caches, hanging off the worker's opaque pointers. */
#define DEADLINES_MAX 32

typedef struct {
    agg_t *aggs;
    unsigned naggs;
    xchg_t *xchgs;
    unsigned nxchgs;
    /* route deadlines as common timeouts of the worker's base (O(1) queues,
     * not the timer heap), by duration */
    struct {
        int ms;
        const struct timeval *tv;
    } deadlines[DEADLINES_MAX];
    unsigned ndeadlines;
    /* refusals logged at most once a second each, with their count */
    uint64_t budget_logged_s, queue_logged_s;
    unsigned budget_refused, queue_refused;
} agg_cache_t;

static const gw_resp_ops_t resp_ops;
/*
 * An answer too large to parse or check on the loop (PARSE_INLINE_MAX,
 * VALID_INLINE_MAX) goes to the thread pool with its body. The exchange
 * waits for it (its connection back in the pool, its call timer running);
 * x->job and job->x link the two until one ends: xchg_free() cancels the
 * job (job->x = NULL), and a job that comes back uncancelled ends its
 * exchange with the result (ajob_done). The job owns the body and what it
 * builds, with their budget bytes; what a cancelled job built is freed on
 * the pool too (a second trip), never on the loop.
 */
struct ajob_s {
    gw_tjob_t job;
    xchg_t *x;             /* worker thread only; NULL once cancelled */
    gw_config_t *cfg;      /* a reference: call lives in it */
    const gw_call_t *call;
    bool raw;              /* check it (gw_json_valid), else parse and shape it */
    char *body;            /* owned */
    size_t len, held;      /* held: the body's gw_budget_responses bytes */
    /* the result */
    gw_fail_t code;        /* GW_FAIL_NONE, _BAD_JSON or _MEMORY_BUDGET */
    json_t *answer, *shaped; /* new references */
    size_t tree;           /* gw_budget_responses bytes the two hold */
    size_t st, vl;         /* raw: the value's place in body */
    char why[200];         /* bad_json: jansson's reason */
    uint64_t us;           /* how long the work took */
};

static const gw_xchg_ops_t xchg_ops;
static void agg_deadline_cb(evutil_socket_t fd, short what, void *arg);
static void call_complete(agg_t *a, size_t i, gw_fail_t code, int status);
static void element_end(agg_t *a, size_t i, size_t item, gw_fail_t code, int status);
static void foreach_fill(agg_t *a, size_t i);
static void batch_chunk_end(agg_t *a, size_t i, size_t chunk, json_t *arr, gw_fail_t code, int status);
static json_t *shape(const gw_call_t *call, json_t *answer);
static void agg_progress(agg_t *a);

/* --- small helpers ------------------------------------------------------- */

static void
buf_str(gw_tpl_buf_t *b, const char *s)
{
    gw_tpl_buf_add(b, s, strlen(s));
}

static agg_cache_t *
cache_of(gw_worker_t *w)
{
    if (w->agg_cache == NULL)
        w->agg_cache = gw_calloc(1, sizeof(agg_cache_t));
    return w->agg_cache;
}

static const gw_call_t *
call_of(const agg_t *a, size_t i)
{
    return a->route->agg.calls[i];
}

/* --- exchanges ----------------------------------------------------------- */

static xchg_t *
xchg_new(agg_t *a, size_t call, size_t item)
{
    agg_cache_t *cache = cache_of(a->w);
    xchg_t *x = cache->xchgs;
    if (x) {
        cache->xchgs = x->next;
        cache->nxchgs--;
    } else {
        x = gw_calloc(1, sizeof(xchg_t));
        x->req.limit = HEAD_MAX;
    }
    x->a = a;
    x->call = call;
    x->item = item;
    x->next = a->running;
    x->prev = NULL;
    if (a->running)
        a->running->prev = x;
    a->running = x;
    return x;
}

static void
xchg_destroy(xchg_t *x)
{
    gw_xchg_destroy(&x->ex);
    gw_tpl_buf_free(&x->req);
    gw_tpl_buf_free(&x->obody);
    free(x->body); /* xchg_free() gave its budget bytes back */
    free(x);
}

/* x is done with its body buffer: the budget gets back what the buffer
 * held, and the buffer stays with x for the next exchange only when small
 * (BODY_CACHE_MAX; the next exchange that fills it takes its bytes again). */
static void
body_release(xchg_t *x)
{
    if (x->bheld)
        gw_budget_give(&gw_budget_responses, x->bheld);
    x->bheld = 0;
    x->blen = 0;
    if (x->bcap > BODY_CACHE_MAX) {
        free(x->body);
        x->body = NULL;
        x->bcap = 0;
    }
}

/* Ends x: its upstream connection is pooled when reusable, else closed;
 * x goes back to the cache. */
static void
xchg_free(xchg_t *x, bool reusable)
{
    agg_t *a = x->a;
    if (x->waiter) { /* it stops waiting; the cache's request goes on */
        gw_cache_waiter_cancel(x->waiter);
        x->waiter = NULL;
    }
    gw_xchg_close(&x->ex, reusable); /* counts the call, gives back what the exchange holds */
    if (x->job) { /* abandoned: it frees what it holds when it is back */
        x->job->x = NULL;
        gw_tpool_cancel(&x->job->job);
        x->job = NULL;
    }
    json_decref(x->shaped);
    x->shaped = NULL;
    body_release(x);
    if (x->prev)
        x->prev->next = x->next;
    else
        a->running = x->next;
    if (x->next)
        x->next->prev = x->prev;
    agg_cache_t *cache = cache_of(a->w);
    if (cache->nxchgs >= XCHG_CACHE_MAX || a->w->stopping || x->obody.cap > (1u << 20)) {
        xchg_destroy(x);
        return;
    }
    gw_xchg_t ex = x->ex; /* closed: only its timers are left, kept */
    gw_tpl_buf_t req = x->req, obody = x->obody;
    char *body = x->body;
    size_t bcap = x->bcap;
    memset(x, 0, sizeof(*x));
    x->ex = ex;
    x->req = req;
    x->req.len = 0;
    x->obody = obody;
    x->obody.len = 0;
    x->body = body;
    x->bcap = bcap;
    x->next = cache->xchgs;
    cache->xchgs = x;
    cache->nxchgs++;
}

/* The exchange of element x->item of a foreach call, or of a plain call,
 * ended: with value (stolen; NULL on failure) or with code. */
static void
xchg_end(xchg_t *x, bool reusable, json_t *value, gw_fail_t code)
{
    json_t *pre = x->shaped; /* value as the thread pool shaped it, if it did */
    x->shaped = NULL;
    /* retries and hedges (gw_exchange): a winning hedge hands over to its owner */
    gw_xchg_t *e = gw_xchg_end_try(&x->ex, code, reusable);
    if (e == NULL) {
        json_decref(pre); /* NULL: only a success is shaped, and a success is never retried */
        return; /* retried, or a hedge still runs */
    }
    x = e->arg;
    agg_t *a = x->a;
    if (e->hedge_won)
        a->calls[x->call].hedge_won = true;
    size_t i = x->call, item = x->item;
    int status = x->ex.status;
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    gw_xchg_outcome(&x->ex, code, status);
    if (call->batch) {
        /* a chunk: its answer (or the array at target) is matched to its
         * values, and each matched element shaped, by batch_chunk_end() */
        json_t *arr = value && call->target_path ? gw_jpath_get(call->target_path, value) : value;
        if (value && arr == NULL)
            code = GW_FAIL_MISSING_TARGET;
        else if (value && !json_is_array(arr))
            code = GW_FAIL_INVALID_VALUE;
        gw_xchg_ended(&x->ex, code);
        xchg_free(x, reusable);
        rt->running--;
        batch_chunk_end(a, i, item, code == GW_FAIL_NONE ? arr : NULL, code, status);
        json_decref(value);
        json_decref(pre);
        return;
    }
    /* shaped before the exchange is counted: an answer without its target
     * is a failed call for the metrics too (not for the breaker) */
    json_t *shaped = NULL;
    if (value) {
        shaped = pre ? pre : shape(call, value); /* NULL from the pool too: shaped here, cheaply, to NULL again */
        if (shaped == NULL)
            code = GW_FAIL_MISSING_TARGET;
    }
    gw_xchg_ended(&x->ex, code);
    xchg_free(x, reusable);
    if (!call->foreach) {
        rt->answer = value;
        rt->value = shaped;
        call_complete(a, i, code, status);
        return;
    }
    /* foreach: the element's answer and shaped value go in its slot (which
     * holds the fallback, or null, until then) */
    rt->running--;
    if (value)
        json_array_set_new(rt->answer, item, value);
    if (shaped)
        json_array_set_new(rt->value, item, shaped);
    element_end(a, i, item, code, status);
    if (!rt->filling)
        foreach_fill(a, i);
}

/* Element item of foreach call i is over, with code (GW_FAIL_NONE: it
 * succeeded), its answer and value in their slots already. */
static void
element_end(agg_t *a, size_t i, size_t item, gw_fail_t code, int status)
{
    call_rt_t *rt = &a->calls[i];
    rt->done_items++;
    rt->elem_done[item] = code == GW_FAIL_NONE ? ELEM_OK : ELEM_FAILED;
    if (code == GW_FAIL_NONE)
        return;
    if (rt->code == GW_FAIL_NONE) {
        rt->code = code;
        rt->status = status;
    }
    json_t **list = code == GW_FAIL_NOT_FOUND ? &rt->missing : &rt->failed;
    if (*list == NULL)
        *list = json_array();
    json_array_append_new(*list, json_integer((json_int_t)item));
    /* a required call fails the request with its first failed element:
     * it is over, so Server-Timing and the access log name its code */
    if (call_of(a, i)->required)
        call_complete(a, i, code, status);
}

/* --- shaping ------------------------------------------------------------- */

/* The call's shaped value of answer (borrowed): a new reference, or NULL
 * when target finds nothing. For a batch call, answer is one matched
 * element: its target chose the array the element came from. */
static json_t *
shape(const gw_call_t *call, json_t *answer)
{
    json_t *v = answer;
    if (call->target_path && !call->batch) {
        v = gw_jpath_get(call->target_path, answer);
        if (v == NULL)
            return NULL;
    }
    json_t *shaped;
    if (call->allow)
        shaped = gw_jpath_allow(v, call->allow);
    else if (call->deny)
        shaped = gw_jpath_deny(v, call->deny);
    else
        shaped = json_incref(v);
    if (shaped == NULL)
        shaped = json_object(); /* nothing kept */
    if (call->nrename && json_is_object(shaped)) {
        /* a new object: shaped may share containers with the answer */
        json_t *renamed = json_object();
        const char *key;
        size_t klen;
        json_t *val;
        json_object_keylen_foreach(shaped, key, klen, val) {
            const char *to = key;
            size_t tlen = klen; /* a key may hold a NUL */
            for (size_t k = 0; k < call->nrename; k++)
                if (strlen(call->rename[k].name) == klen && memcmp(call->rename[k].name, key, klen) == 0) {
                    to = call->rename[k].value;
                    tlen = strlen(to);
                }
            json_object_setn(renamed, to, tlen, val);
        }
        json_decref(shaped);
        shaped = renamed;
    }
    return shaped;
}

/* --- calls --------------------------------------------------------------- */

/* Call i finished: OK when code is GW_FAIL_NONE. A foreach call is finished when
 * its last element is (its code is then the first failed element's), or
 * when it could not run at all. */
static bool
call_over(const call_rt_t *rt)
{
    return rt->state == CALL_OK || rt->state == CALL_FAILED || rt->state == CALL_SKIPPED;
}

/* The values of foreach call i without its skipped elements (a condition
 * naming {item} filters the array when there is no skip_value). */
static void
drop_skipped(agg_t *a, size_t i)
{
    call_rt_t *rt = &a->calls[i];
    json_t *kept = json_array();
    for (size_t k = 0; k < rt->nitems; k++)
        if (rt->elem_done[k] != ELEM_SKIPPED)
            json_array_append(kept, json_array_get(rt->value, k));
    json_decref(rt->value);
    rt->value = kept;
}

static void
call_complete(agg_t *a, size_t i, gw_fail_t code, int status)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    if (call_over(rt))
        return;
    if (rt->start_us)
        rt->end_us = gw_now_us();
    a->pending--;
    if (call->foreach || call->batch) {
        /* rt->value holds the elements' values (partial after a deadline);
         * a call that never started has none and is left out */
        if (code == GW_FAIL_NONE) {
            code = rt->code;
            status = rt->status;
        }
        if (call->when_item && !call->skip_value && !call->into && rt->value)
            drop_skipped(a, i);
    } else if (code != GW_FAIL_NONE) {
        /* a successful answer was shaped by xchg_end(), or is kept unparsed
         * (rt->raw): the fallback is for failures only */
        rt->value = call->fallback ? json_incref(call->fallback) : NULL;
    }
    rt->code = code;
    rt->status = status;
    if (code == GW_FAIL_NONE) {
        rt->state = CALL_OK;
        a->answers[i] = rt->answer;
        return;
    }
    rt->state = CALL_FAILED;
    gw_log_rl(GW_LOG_INFO, "aggregate %s: call %s failed: %s, request %s", a->route->pattern, call->name,
           gw_fail_name(code), gw_conn_req(a->c)->request_id);
    if (call->required && a->fatal == 0)
        a->fatal = (int)i + 1;
}

/* Fails every call still running (the deadline passed): their exchanges are
 * closed, never pooled half-read. */
static void
cancel_all(agg_t *a, gw_fail_t code)
{
    while (a->running) {
        gw_xchg_ended(&a->running->ex, code); /* why it is cut short */
        xchg_free(a->running, false);
    }
    for (size_t i = 0; i < a->route->agg.ncalls; i++) {
        call_rt_t *rt = &a->calls[i];
        if (call_over(rt))
            continue;
        if (rt->elem_done) {
            /* a foreach call: the elements not answered failed too */
            for (size_t k = 0; k < rt->nitems; k++) {
                if (rt->elem_done[k])
                    continue;
                if (rt->failed == NULL)
                    rt->failed = json_array();
                json_array_append_new(rt->failed, json_integer((json_int_t)k));
            }
            rt->running = 0;
        }
        call_complete(a, i, code, 0);
    }
}

static const gw_tpl_ctx_t *
tpl_ctx(agg_t *a, const json_t *item, gw_tpl_ctx_t *ctx)
{
    ctx->req = gw_conn_req(a->c);
    ctx->match = &a->match;
    ctx->results = a->answers;
    ctx->nresults = a->route->agg.ncalls;
    ctx->item = item;
    return ctx;
}

/* Whether call's condition holds now (item: the foreach element, or NULL). */
static bool
cond_holds(agg_t *a, const gw_call_t *call, const json_t *item)
{
    gw_tpl_ctx_t ctx;
    return gw_cond_eval(call->when, tpl_ctx(a, item, &ctx));
}

/* Call i is skipped (its condition does not hold, or a call it needs was
 * skipped): nothing is sent, it is not a failure, and skip_value, if any,
 * takes its place (for a call with "into", in the source's elements:
 * enrich()). */
static void
call_skip(agg_t *a, size_t i)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    rt->state = CALL_SKIPPED;
    a->pending--;
    if (call->skip_value && !call->into)
        rt->value = json_incref(call->skip_value);
    gw_log_debug("aggregate %s: call %s skipped, request %s", a->route->pattern, call->name,
                 gw_conn_req(a->c)->request_id);
}

/* Element k of foreach call i is skipped (its condition, which names
 * {item}, does not hold): not sent, not a failure. */
static void
element_skip(agg_t *a, size_t i, size_t k)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    rt->done_items++;
    rt->elem_done[k] = ELEM_SKIPPED;
    if (call->skip_value)
        json_array_set(rt->value, k, call->skip_value);
}

/* Builds x's request: head in x->req, a JSON body in x->out_body.
 * GW_FAIL_NONE, or the failure code with the reason logged. */
static gw_fail_t
build_request(xchg_t *x, const json_t *item)
{
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    gw_req_t *r = gw_conn_req(a->c);
    gw_tpl_ctx_t ctx;
    gw_tpl_err_t err;
    tpl_ctx(a, item, &ctx);
    gw_tpl_buf_t *b = &x->req;
    b->len = 0;
    const char *what = "path";
    buf_str(b, llhttp_method_name((llhttp_method_t)call->method));
    gw_tpl_buf_add(b, " ", 1);
    size_t tstart = b->len;
    if (gw_tpl_render(call->target, &ctx, b, &err) != GW_OK)
        goto fail;
    if (call->batch) /* the chunk's values, as a query parameter */
        gw_batch_query(a->calls[x->call].plan, call->batch, x->item,
                       memchr(b->data + tstart, '?', b->len - tstart) != NULL, b);
    buf_str(b, " HTTP/1.1\r\nHost: ");
    x->ex.host_off = b->len; /* each try's server writes its Host value here (gw_exchange) */
    gw_tpl_buf_add(b, "\r\n", 2);
    bool accept = false, ctype = false;
    for (size_t k = 0; k < call->nheaders; k++) {
        const gw_call_header_t *h = &call->headers[k];
        what = h->name;
        buf_str(b, h->name);
        gw_tpl_buf_add(b, ": ", 2);
        if (gw_tpl_render(h->value, &ctx, b, &err) != GW_OK)
            goto fail;
        gw_tpl_buf_add(b, "\r\n", 2);
        accept = accept || strcasecmp(h->name, "accept") == 0;
        ctype = ctype || strcasecmp(h->name, "content-type") == 0;
    }
    for (size_t k = 0; k < call->nforward; k++) {
        /* every field of the name, in order */
        const char *name = call->forward_headers[k];
        size_t nlen = strlen(name);
        for (size_t h = 0; h < r->nheaders; h++) {
            const gw_header_t *hd = &r->headers[h];
            if (hd->name_len != nlen || strncasecmp(r->hbuf + hd->name_off, name, nlen) != 0)
                continue;
            gw_tpl_buf_add(b, r->hbuf + hd->name_off, hd->name_len);
            gw_tpl_buf_add(b, ": ", 2);
            gw_tpl_buf_add(b, r->hbuf + hd->value_off, hd->value_len);
            gw_tpl_buf_add(b, "\r\n", 2);
            accept = accept || strcasecmp(name, "accept") == 0;
            ctype = ctype || strcasecmp(name, "content-type") == 0;
        }
    }
    if (!accept)
        buf_str(b, "Accept: application/json\r\n");
    gw_proxy_add_forwarding(a->c, &b->data, &b->len, &b->cap);
    x->has_obody = false;
    x->out_len = 0;
    if (call->body) {
        what = "body";
        json_t *body = gw_tpl_json_render(call->body, &ctx, &err);
        if (body == NULL)
            goto fail;
        x->obody.len = 0;
        gw_json_dump(body, &x->obody);
        json_decref(body);
        x->has_obody = true;
        x->out_len = x->obody.len;
        if (!ctype)
            buf_str(b, "Content-Type: application/json\r\n");
    } else if (call->forward_body) {
        size_t ctlen = 0;
        const char *ct = gw_req_header(r, "content-type", &ctlen);
        if (ct && !ctype) {
            buf_str(b, "Content-Type: ");
            gw_tpl_buf_add(b, ct, ctlen);
            gw_tpl_buf_add(b, "\r\n", 2);
        }
        x->out_len = evbuffer_get_length(r->body);
    }
    if (call->body || call->forward_body || call->method == HTTP_POST || call->method == HTTP_PUT ||
        call->method == HTTP_PATCH) {
        char cl[48];
        int n = snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", x->out_len);
        gw_tpl_buf_add(b, cl, (size_t)n);
    }
    gw_tpl_buf_add(b, "\r\n", 2);
    if (b->len > HEAD_MAX) {
        err.code = GW_FAIL_INVALID_VALUE;
        snprintf(err.detail, sizeof(err.detail), "the request head is over %d bytes", HEAD_MAX);
        goto fail;
    }
    return GW_FAIL_NONE;
fail:
    gw_log_rl(GW_LOG_NOTICE, "aggregate %s: call %s: %s in %s: %s, request %s", a->route->pattern, call->name,
           gw_fail_name(err.code), what, err.detail, r->request_id);
    return err.code;
}

/* The hash of backend b's hash_key for this request (hash balance), into
 * ex; a key that cannot be rendered (a header absent) leaves none: the
 * call is balanced by round robin. */
static void
call_hash(agg_t *a, const gw_backend_t *b, const json_t *item, gw_xchg_t *ex)
{
    if (b->hash_key == NULL)
        return;
    gw_tpl_ctx_t ctx;
    gw_tpl_err_t err;
    gw_tpl_buf_t key = { 0 };
    if (gw_tpl_render(b->hash_key, tpl_ctx(a, item, &ctx), &key, &err) == GW_OK) {
        ex->hash = gw_cluster_hash(key.data, key.len);
        ex->has_hash = true;
    }
    gw_tpl_buf_free(&key);
}

/* Logs why call i's exchange could not send a try (code from gw_exchange:
 * the queue, max_connections, a socket; err: errno). */
static void
start_failed_log(agg_t *a, const gw_call_t *call, gw_fail_t code, int err)
{
    const gw_backend_t *b = call->backend;
    const char *rid = gw_conn_req(a->c)->request_id;
    if (code == GW_FAIL_QUEUE_FULL)
        gw_log_rl(GW_LOG_WARN, "backend %s: queue full (max_pending %u) while starting call %s, client %s, request %s",
                  b->name, b->max_pending, call->name, gw_conn_peer_ip(a->c), rid);
    else if (code == GW_FAIL_QUEUE_TIMEOUT)
        gw_log_rl(GW_LOG_WARN, "backend %s: no connection within queue_timeout_ms (%d) for call %s, request %s",
                  b->name, b->queue_timeout_ms, call->name, rid);
    else if (code == GW_FAIL_UNAVAILABLE || code == GW_FAIL_CONNECT_FAILED)
        gw_log_rl(GW_LOG_ERR, "backend %s: %s%s%s while starting call %s, client %s, request %s", b->name,
                  code == GW_FAIL_UNAVAILABLE ? "max_connections reached" : "cannot connect",
                  code == GW_FAIL_UNAVAILABLE ? "" : ": ", code == GW_FAIL_UNAVAILABLE ? "" : strerror(err),
                  call->name, gw_conn_peer_ip(a->c), rid);
    else if (code == GW_FAIL_NO_HEALTHY_SERVER)
        gw_log_rl(GW_LOG_WARN, "backend %s: no_healthy_server: none of its %zu servers is usable (unhealthy or "
                  "ejected) for call %s, client %s, request %s", b->name, b->nservers, call->name,
                  gw_conn_peer_ip(a->c), rid);
}

/* --- the cache (gw_cache.h): hits, and waiting for its request ------------ */

static bool body_room(xchg_t *x, const gw_resp_t *r, size_t len);
static void xchg_finish(xchg_t *x, bool reusable);
static void refusal_log(agg_t *a, const gw_call_t *call, bool budget);

/* x's answer is v (borrowed; the cache's bytes are copied into x's body
 * buffer, under the response budget), served as how: judged and parsed as
 * if the backend had just sent it. */
static void
xchg_from_val(xchg_t *x, const gw_cache_val_t *v, int how)
{
    agg_t *a = x->a;
    call_rt_t *rt = &a->calls[x->call];
    uint64_t now = gw_now_ms();
    uint64_t age = now > v->stored_ms ? now - v->stored_ms : 0;
    if (how > rt->served)
        rt->served = (unsigned char)how;
    if (how == SERVED_STALE_ERROR && age > rt->stale_age_ms)
        rt->stale_age_ms = age;
    if (how >= SERVED_HIT && (int64_t)age > a->age_ms)
        a->age_ms = (int64_t)age;
    x->ex.status = v->status;
    x->blen = 0;
    x->ex.rd.content_length = (int64_t)v->len; /* body_room() takes it whole */
    if (v->len && !body_room(x, &x->ex.rd, v->len)) {
        refusal_log(a, call_of(a, x->call), true);
        xchg_end(x, false, NULL, GW_FAIL_MEMORY_BUDGET);
        return;
    }
    if (v->len)
        memcpy(x->body, v->body, v->len);
    x->blen = v->len;
    xchg_finish(x, false);
}

/* The cache's request that x waited for ended (x's worker, through its
 * port): x ends with its answer, an old answer (stale-if-error), or its
 * failure. An entry point: it ends with agg_progress(). */
static void
cache_waiter_done(gw_tjob_t *j)
{
    gw_cache_waiter_t *wt = (gw_cache_waiter_t *)j;
    xchg_t *x = wt->arg;
    if (x == NULL) { /* its request ended first */
        gw_cache_waiter_free(wt);
        return;
    }
    x->waiter = NULL;
    agg_t *a = x->a;
    gw_conn_t *c = a->c;
    if (wt->val && wt->stale)
        gw_log_rl(GW_LOG_INFO, "aggregate %s: call %s failed (%s): its stale answer is served (stale_if_error_ms), "
                  "request %s", a->route->pattern, call_of(a, x->call)->name, gw_fail_name(wt->code),
                  gw_conn_req(c)->request_id);
    if (wt->val) {
        xchg_from_val(x, wt->val, wt->stale ? SERVED_STALE_ERROR : x->lead ? SERVED_BACKEND : SERVED_COALESCED);
    } else {
        x->ex.status = wt->status;
        xchg_end(x, false, NULL, wt->code);
    }
    gw_cache_waiter_free(wt);
    agg_progress(a);
    gw_conn_release(c);
}

/* x's call caches or coalesces: its request (rendered in x) is looked up
 * and answered from the cache at once, or waits for the cache's request
 * (started here on a miss). False when x must go to the backend itself: a
 * request still on an older configuration than its worker's (a fetch holds
 * the worker's current one). */
static bool
cache_start(agg_t *a, xchg_t *x)
{
    const gw_call_t *call = call_of(a, x->call);
    if (gw_conn_config(a->c) != a->w->cfg)
        return false;
    gw_cache_ask_t ask = { .port = a->w->tport, .done = cache_waiter_done, .arg = x };
    /* the request as xchg_start() rendered it, its hash (call_hash) included:
     * the fetch goes to the server the call would have gone to */
    gw_fetch_req_t rq = { .head = x->req.data,
                          .head_len = x->req.len,
                          .host_off = x->ex.host_off,
                          .body = x->has_obody ? x->obody.data : NULL,
                          .body_len = x->has_obody ? x->out_len : 0,
                          .hash = x->ex.hash,
                          .has_hash = x->ex.has_hash,
                          .rid = gw_conn_req(a->c)->request_id,
                          .peer = gw_conn_peer_ip(a->c) };
    gw_cache_result_t res = gw_fetch_lookup(a->w, call, &rq, &ask);
    if (res == GW_CACHE_HIT || res == GW_CACHE_STALE) {
        xchg_from_val(x, ask.val, res == GW_CACHE_HIT ? SERVED_HIT : SERVED_STALE);
        gw_cache_val_unref(ask.val);
        return true;
    }
    x->waiter = ask.waiter;
    x->lead = res == GW_CACHE_LEAD;
    return true;
}

/* Starts one exchange of call i (element item of a foreach call). Its
 * failure to start ends it at once. */
static void
xchg_start(agg_t *a, size_t i, size_t item, const json_t *item_value)
{
    const gw_call_t *call = call_of(a, i);
    xchg_t *x = xchg_new(a, i, item);
    gw_xchg_t *ex = &x->ex;
    gw_xchg_init(ex, &xchg_ops, x, a, a->w, call->backend, call->name, gw_conn_req(a->c)->request_id,
                 gw_conn_peer_ip(a->c));
    x->limit = call->backend->max_response_bytes;
    gw_fail_t code = build_request(x, item_value);
    if (code == GW_FAIL_NONE) {
        ex->head = x->req.data;
        ex->head_len = x->req.len;
        call_hash(a, call->backend, item_value, ex);
        ex->method = call->method;
        ex->max_body = x->limit;
        ex->timeout_ms = call->timeout_ms;
        ex->deadline_us = a->deadline_us;
        ex->per_try = true;
        ex->hedge_ms = call->hedge_after_ms;
        if (call->cache && cache_start(a, x))
            return; /* answered from the cache, or waiting for its request */
        code = gw_xchg_start(ex);
        start_failed_log(a, call, code, errno);
    }
    if (code != GW_FAIL_NONE)
        xchg_end(x, false, NULL, code);
}

static void fill_cb(evutil_socket_t fd, short what, void *arg);

/* Starts elements of foreach call i up to its concurrency, at most
 * FILL_BATCH now: the rest next turn (fill_cb). */
static void
foreach_fill(agg_t *a, size_t i)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    unsigned started = 0;
    /* an element that fails to start ends inside xchg_start(): filling
     * keeps it from calling back in here, so the stack stays flat */
    rt->filling = true;
    while (rt->state == CALL_RUNNING && rt->next_item < rt->nitems && rt->running < call->foreach_concurrency &&
           !a->fatal) {
        if (started++ == FILL_BATCH) {
            if (a->fill == NULL)
                a->fill = event_new(a->w->base, -1, 0, fill_cb, a);
            event_active(a->fill, EV_TIMEOUT, 0);
            break;
        }
        size_t k = rt->next_item++;
        json_t *item = json_array_get(rt->items, k);
        if (call->when_item && !cond_holds(a, call, item)) {
            element_skip(a, i, k);
            continue;
        }
        if (call->into && !json_is_object(item)) {
            /* nowhere to put its result: not sent */
            gw_log_rl(GW_LOG_NOTICE,
                      "aggregate %s: call %s: element %zu of \"%s.%s\" is not an object, \"into\" cannot put a "
                      "result in it, request %s", a->route->pattern, call->name, k,
                      call_of(a, call->foreach_call)->name, gw_jpath_text(call->foreach_path),
                      gw_conn_req(a->c)->request_id);
            element_end(a, i, k, GW_FAIL_INVALID_VALUE, 0);
            continue;
        }
        rt->running++;
        xchg_start(a, i, k, item);
    }
    rt->filling = false;
    if (rt->state == CALL_RUNNING && rt->done_items == rt->nitems)
        call_complete(a, i, GW_FAIL_NONE, 0);
}

/* The next turn after a foreach_fill() that stopped at FILL_BATCH. */
static void
fill_cb(evutil_socket_t fd, short what, void *arg)
{
    agg_t *a = arg;
    gw_conn_t *c = a->c;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    for (size_t i = 0; i < a->route->agg.ncalls && !a->fatal; i++)
        if (call_of(a, i)->foreach && a->calls[i].state == CALL_RUNNING)
            foreach_fill(a, i);
    agg_progress(a);
    gw_conn_release(c);
}

/*
 * Batched calls (gw_batch.h): the source's array is planned into chunks of
 * unique values, and up to the batch's concurrency chunks are in flight.
 * Elements are what foreach calls have (elem_done, answer and value slots,
 * failed, into), so enrich() and the answer treat both alike; an element
 * is over when its chunk is, or at once when it sends nothing.
 */
static void
batch_fill(agg_t *a, size_t i)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    rt->filling = true; /* a chunk that fails to start ends inside xchg_start() */
    while (rt->state == CALL_RUNNING && rt->next_item < gw_batch_chunks(rt->plan) &&
           rt->running < call->batch->concurrency && !a->fatal) {
        rt->running++;
        xchg_start(a, i, rt->next_item++, NULL);
    }
    rt->filling = false;
    if (rt->state == CALL_RUNNING && rt->done_items == rt->nitems)
        call_complete(a, i, GW_FAIL_NONE, 0);
}

/* Chunk c of batch call i is over: arr (borrowed) is its answer's array,
 * or NULL when it failed with code. Each element of the chunk gets its
 * matched element (shaped) or not_found, or the chunk's failure. */
static void
batch_chunk_end(agg_t *a, size_t i, size_t c, json_t *arr, gw_fail_t code, int status)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    if (arr != NULL)
        gw_batch_match(rt->plan, call->batch, c, arr);
    for (size_t k = 0; k < rt->nitems && !call_over(rt); k++) {
        size_t ck;
        if (rt->elem_done[k] || gw_batch_elem(rt->plan, k, &ck) != GW_FAIL_NONE || ck != c)
            continue;
        json_t *found = arr ? gw_batch_found(rt->plan, k) : NULL;
        if (found) {
            json_array_set(rt->answer, k, found);
            json_array_set_new(rt->value, k, shape(call, found));
        }
        element_end(a, i, k, found ? GW_FAIL_NONE : arr ? GW_FAIL_NOT_FOUND : code, found ? 0 : status);
    }
    if (!rt->filling)
        batch_fill(a, i);
}

/* Starts batch call i over items (its source's array, checked). The
 * path is rendered once here to know how many values fit a request. */
static void
batch_start(agg_t *a, size_t i, json_t *items)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    gw_tpl_ctx_t ctx;
    gw_tpl_err_t err;
    gw_tpl_buf_t path = {0};
    if (gw_tpl_render(call->target, tpl_ctx(a, NULL, &ctx), &path, &err) != GW_OK) {
        gw_log_rl(GW_LOG_NOTICE, "aggregate %s: call %s: %s in path: %s, request %s", a->route->pattern, call->name,
                  gw_fail_name(err.code), err.detail, gw_conn_req(a->c)->request_id);
        call_complete(a, i, err.code, 0);
        return;
    }
    rt->plan = gw_batch_plan_new(call->batch, items, call->into != NULL, path.len);
    gw_tpl_buf_free(&path);
    gw_log_debug("aggregate %s: call %s: %zu elements, %zu values in %zu requests, request %s", a->route->pattern,
                 call->name, rt->nitems, gw_batch_values(rt->plan), gw_batch_chunks(rt->plan),
                 gw_conn_req(a->c)->request_id);
    rt->filling = true;
    for (size_t k = 0; k < rt->nitems && !call_over(rt); k++) {
        size_t ck;
        gw_fail_t code = gw_batch_elem(rt->plan, k, &ck);
        if (code != GW_FAIL_NONE)
            element_end(a, i, k, code, 0); /* sends nothing */
    }
    rt->filling = false;
    batch_fill(a, i);
}

/* Starts call i, whose dependencies all succeeded. */
static void
call_start(agg_t *a, size_t i)
{
    const gw_call_t *call = call_of(a, i);
    call_rt_t *rt = &a->calls[i];
    rt->state = CALL_RUNNING;
    rt->start_us = gw_now_us();
    if (!call->foreach && !call->batch) {
        xchg_start(a, i, 0, NULL);
        return;
    }
    json_t *items = gw_jpath_get(call->foreach_path, a->calls[call->foreach_call].answer);
    gw_fail_t code = GW_FAIL_NONE;
    const char *why = NULL;
    unsigned max = call->batch ? call->batch->max_items : call->foreach_max;
    if (items == NULL || json_is_null(items)) {
        code = GW_FAIL_MISSING_VALUE;
        why = "absent";
    } else if (!json_is_array(items)) {
        code = GW_FAIL_INVALID_VALUE;
        why = "not an array";
    } else if (json_array_size(items) > max) {
        code = GW_FAIL_TOO_MANY_ITEMS;
        why = call->batch ? "longer than max_items" : "longer than foreach_max";
    }
    if (code != GW_FAIL_NONE) {
        gw_log_rl(GW_LOG_NOTICE, "aggregate %s: call %s: %s \"%s.%s\" is %s, request %s", a->route->pattern, call->name,
                  call->batch ? "batch" : "foreach", call_of(a, call->foreach_call)->name,
                  gw_jpath_text(call->foreach_path), why, gw_conn_req(a->c)->request_id);
        call_complete(a, i, code, 0);
        return;
    }
    rt->items = items;
    rt->nitems = json_array_size(items);
    rt->answer = json_array();
    rt->value = json_array();
    rt->elem_done = gw_calloc(rt->nitems + 1, 1);
    for (size_t k = 0; k < rt->nitems; k++) {
        json_array_append_new(rt->answer, json_null());
        json_array_append_new(rt->value, call->fallback ? json_incref(call->fallback) : json_null());
    }
    if (call->batch)
        batch_start(a, i, items);
    else
        foreach_fill(a, i);
}

/* Starts what is ready and fails what cannot run, until nothing changes. */
static void
schedule(agg_t *a)
{
    size_t n = a->route->agg.ncalls;
    bool changed = true;
    while (changed && !a->fatal) {
        changed = false;
        for (size_t i = 0; i < n && !a->fatal; i++) {
            if (a->calls[i].state != CALL_WAITING)
                continue;
            const gw_call_t *call = call_of(a, i);
            uint64_t deps = call->deps;
            bool ready = true, failed = false, skip = false;
            for (size_t d = 0; d < n && deps; d++, deps >>= 1) {
                if (!(deps & 1))
                    continue;
                if (a->calls[d].state == CALL_FAILED)
                    failed = true;
                else if (a->calls[d].state == CALL_SKIPPED)
                    skip = skip || (call->needs & (1ULL << d)); /* else only its "when" names it: absent there */
                else if (a->calls[d].state != CALL_OK)
                    ready = false;
            }
            /* a failure decides at once; a skip once every dependency is over */
            if (failed)
                call_complete(a, i, GW_FAIL_DEPENDENCY_FAILED, 0);
            else if (!ready)
                continue;
            else if (skip || (call->when && !call->when_item && !cond_holds(a, call, NULL)))
                call_skip(a, i);
            else
                call_start(a, i);
            changed = true;
        }
    }
}

/* --- the answer ---------------------------------------------------------- */

static void
timing_add(gw_tpl_buf_t *b, bool first, const char *name, uint64_t us, const char *desc)
{
    char num[64];
    uint64_t tenths = (us + 50) / 100; /* milliseconds with one decimal, without printf's float path */
    int n = snprintf(num, sizeof(num), ";dur=%llu.%u", (unsigned long long)(tenths / 10), (unsigned)(tenths % 10));
    if (!first)
        gw_tpl_buf_add(b, ", ", 2);
    buf_str(b, name);
    gw_tpl_buf_add(b, num, (size_t)n);
    if (desc) {
        buf_str(b, ";desc=\"");
        buf_str(b, desc);
        gw_tpl_buf_add(b, "\"", 1);
    }
}

static const char *const served_desc[] = { NULL, "coalesced", "cache-hit", "stale", "stale" };

static uint64_t
call_us(const call_rt_t *rt)
{
    return rt->start_us && rt->end_us > rt->start_us ? rt->end_us - rt->start_us : 0;
}

/* The access log gets the failed calls with their codes and the upstream
 * time (first call started to last call done); gw_alog formats them. */
static void
note_access_log(agg_t *a)
{
    gw_alog_rec_t *rec = gw_conn_alog(a->c);
    uint64_t first = 0, last = 0;
    for (size_t i = 0; i < a->route->agg.ncalls; i++) {
        const call_rt_t *rt = &a->calls[i];
        if (rt->state == CALL_FAILED)
            gw_alog_rec_fail(rec, call_of(a, i)->name, rt->code);
        if (rt->start_us && (first == 0 || rt->start_us < first))
            first = rt->start_us;
        if (rt->end_us > last)
            last = rt->end_us;
    }
    if (first)
        rec->up_us = (int64_t)((last > first ? last : gw_now_us()) - first);
}

/* "Server-Timing: ...\r\n" into a->hdrs (replacing its content): each
 * call's duration (with its failure code as desc), then the total. */
static void
server_timing(agg_t *a)
{
    gw_tpl_buf_t *h = &a->hdrs;
    h->len = 0;
    buf_str(h, "Server-Timing: ");
    for (size_t i = 0; i < a->route->agg.ncalls; i++) {
        const call_rt_t *rt = &a->calls[i];
        timing_add(h, i == 0, call_of(a, i)->name, call_us(rt),
                   rt->state == CALL_FAILED    ? gw_fail_name(rt->code)
                   : rt->state == CALL_SKIPPED ? "skipped"
                   : rt->hedge_won             ? "hedge"
                                               : served_desc[rt->served]);
    }
    timing_add(h, false, "total", gw_now_us() - a->start_us, NULL);
    gw_tpl_buf_add(h, "\r\n", 2);
    note_access_log(a);
}

static void
respond_error(agg_t *a)
{
    size_t i = (size_t)a->fatal - 1;
    const call_rt_t *rt = &a->calls[i];
    const gw_call_t *call = call_of(a, i);
    int status = gw_fail_status(rt->code);
    int retry_s = gw_fail_retry_after(rt->code); /* Retry-After */
    if (retry_s < 0)
        retry_s = gw_breaker_retry_after_s(call->backend);
    char extra[256];
    int n = snprintf(extra, sizeof(extra), ",\"call\":\"%s\"", call->name);
    if (rt->status)
        snprintf(extra + n, sizeof(extra) - (size_t)n, ",\"status\":%d", rt->status);
    server_timing(a);
    if (retry_s) {
        char ra[40];
        int k = snprintf(ra, sizeof(ra), "Retry-After: %d\r\n", retry_s);
        gw_tpl_buf_add(&a->hdrs, ra, (size_t)k);
    }
    gw_conn_error_headers(a->c, status, gw_fail_name(rt->code), extra, a->hdrs.data);
}

/*
 * The value of call s, which succeeded, when calls with "into" put their
 * results into its answer: a copy of the answer (only the containers on
 * the way and the elements that get a key are copied; templates keep
 * seeing the answer as the backend sent it), each such call's results put
 * in the order the calls are listed, then shaped as the call's own answer
 * is. Replaces rt->value. Runs where the aggregate is built (maybe the
 * thread pool): it reads only this request's results and the route.
 */
static void
enrich(agg_t *a, size_t s)
{
    call_rt_t *src = &a->calls[s];
    json_t *doc = json_incref(src->answer);
    for (size_t j = 0; j < a->route->agg.ncalls && doc != NULL; j++) {
        const gw_call_t *cj = call_of(a, j);
        const call_rt_t *rj = &a->calls[j];
        if (cj->into == NULL || cj->foreach_call != s)
            continue;
        bool whole_skip = rj->state == CALL_SKIPPED;
        /* nothing to put when it never ran (its array was absent or too
         * long, the deadline came first) or was skipped without skip_value */
        if (whole_skip ? cj->skip_value == NULL : rj->elem_done == NULL)
            continue;
        json_t *arr = gw_jpath_get(cj->foreach_path, doc);
        if (!json_is_array(arr))
            continue; /* a skipped call's array was never looked at */
        json_t *out = json_array();
        for (size_t k = 0; k < json_array_size(arr); k++) {
            json_t *e = json_array_get(arr, k);
            json_t *put = NULL;
            if (json_is_object(e) && whole_skip)
                put = cj->skip_value;
            else if (json_is_object(e) && k < rj->nitems)
                put = rj->elem_done[k] == ELEM_OK        ? json_array_get(rj->value, k)
                      : rj->elem_done[k] == ELEM_SKIPPED ? cj->skip_value
                                                         : cj->fallback; /* failed, or cut short by the deadline */
            if (put == NULL) {
                json_array_append(out, e);
                continue;
            }
            json_t *copy = json_copy(e);
            json_object_set(copy, cj->into, put);
            json_array_append_new(out, copy);
        }
        json_t *next = gw_jpath_replace(doc, cj->foreach_path, out);
        json_decref(doc);
        doc = next;
    }
    json_t *v = doc ? shape(call_of(a, s), doc) : NULL;
    json_decref(doc);
    if (v == NULL)
        return; /* the target went away under an enrichment ("into" replaced a key on its way): as sent */
    json_decref(src->value);
    src->value = v;
}

/* Builds the aggregate of a finished request into a->out (and
 * a->complete), on the loop or on the thread pool (build_run): it reads
 * the route and the calls' results, which nothing changes meanwhile. */
static void
respond_build(agg_t *a)
{
    const gw_route_t *route = a->route;
    bool group = route->agg.merge == GW_MERGE_GROUP;
    /* group mode writes the document directly (group keys are unique);
     * merge mode builds it, since later keys replace earlier ones */
    json_t *doc = group ? NULL : json_object();
    json_t *errors = NULL;
    a->out.len = 0;
    gw_tpl_buf_add(&a->out, "{", 1);
    bool complete = true;
    for (size_t i = 0; route->agg.enriched && i < route->agg.ncalls; i++)
        if ((route->agg.enriched & (1ULL << i)) && a->calls[i].state == CALL_OK && a->calls[i].answer)
            enrich(a, i);
    for (size_t i = 0; i < route->agg.ncalls; i++) {
        const gw_call_t *call = call_of(a, i);
        call_rt_t *rt = &a->calls[i];
        if (rt->state == CALL_FAILED) {
            complete = false;
            if (route->agg.errors) {
                if (errors == NULL)
                    errors = json_object();
                json_t *e =
                    json_pack("{s:s,s:f}", "code", gw_fail_name(rt->code), "ms", (double)(call_us(rt) / 100) / 10.0);
                if (rt->status)
                    json_object_set_new(e, "status", json_integer(rt->status));
                if (rt->failed)
                    json_object_set(e, "failed", rt->failed);
                if (rt->missing)
                    json_object_set(e, "missing", rt->missing);
                json_object_set_new(errors, call->name, e);
            }
        }
        if (rt->state == CALL_OK && rt->served == SERVED_STALE_ERROR) {
            /* old data in place of missing data: it says so */
            complete = false;
            if (route->agg.errors) {
                if (errors == NULL)
                    errors = json_object();
                json_object_set_new(errors, call->name, json_pack("{s:s,s:I}", "code", "stale", "age_ms",
                                                                  (json_int_t)rt->stale_age_ms));
            }
        }
        if (call->into)
            continue; /* its results are in its source's value */
        if (rt->value == NULL && !(rt->raw && rt->state == CALL_OK))
            continue;
        if (group) {
            if (a->out.len > 1)
                gw_tpl_buf_add(&a->out, ",", 1);
            gw_json_dump_string(call->group, strlen(call->group), &a->out);
            gw_tpl_buf_add(&a->out, ":", 1);
            if (rt->value)
                gw_json_dump(rt->value, &a->out);
            else
                gw_tpl_buf_add(&a->out, (rt->rbuf ? rt->rbuf : a->raws.data) + rt->raw_off, rt->raw_len);
        } else if (json_is_object(rt->value)) {
            json_object_update(doc, rt->value);
        } else {
            json_object_set(doc, call->group, rt->value);
        }
    }
    if (doc) {
        if (errors)
            json_object_set(doc, "_errors", errors);
        a->out.len = 0;
        gw_json_dump(doc, &a->out);
        json_decref(doc);
    } else {
        if (errors) {
            buf_str(&a->out, a->out.len > 1 ? ",\"_errors\":" : "\"_errors\":");
            gw_json_dump(errors, &a->out);
        }
        gw_tpl_buf_add(&a->out, "}", 1);
    }
    json_decref(errors);
    a->complete = complete;
}

/* Sends the aggregate respond_build() made. */
static void
respond_send(agg_t *a)
{
    server_timing(a);
    buf_str(&a->hdrs, a->complete ? "Content-Type: application/json\r\nX-Gateway-Completed: true\r\n"
                                  : "Content-Type: application/json\r\nX-Gateway-Completed: false\r\n");
    if (a->age_ms >= 0) { /* the oldest answer the cache gave, in seconds */
        char age[40];
        int n = snprintf(age, sizeof(age), "Age: %lld\r\n", (long long)(a->age_ms / 1000));
        gw_tpl_buf_add(&a->hdrs, age, (size_t)n);
    }
    gw_conn_start_response(a->c, 200, a->hdrs.data, a->hdrs.len, (int64_t)a->out.len);
    if (a->out.len >= BODY_CACHE_MAX) { /* handed over, not copied (8 MB: a few ms of page faults) */
        gw_conn_body_take(a->c, a->out.data, a->out.len);
        a->out.data = NULL;
        a->out.len = a->out.cap = 0;
    } else {
        gw_conn_body(a->c, a->out.data, a->out.len);
    }
    gw_conn_end_response(a->c);
}

/* --- the context --------------------------------------------------------- */

static void
agg_destroy(agg_t *a)
{
    event_free(a->deadline);
    if (a->fill)
        event_free(a->fill);
    gw_tpl_buf_free(&a->out);
    gw_tpl_buf_free(&a->hdrs);
    gw_tpl_buf_free(&a->raws);
    free(a);
}

/* What a request's answers hold, freed on the thread pool. */
typedef struct {
    gw_tjob_t job;
    json_t *refs[4 * GW_TPL_MAX_CALLS];
    char *bufs[GW_TPL_MAX_CALLS];
    size_t nrefs, nbufs, held; /* held: their gw_budget_responses bytes */
} fjob_t;

static void
fjob_run(gw_tjob_t *j)
{
    fjob_t *f = (fjob_t *)j;
    for (size_t k = 0; k < f->nrefs; k++)
        json_decref(f->refs[k]);
    for (size_t k = 0; k < f->nbufs; k++)
        free(f->bufs[k]);
    gw_budget_give(&gw_budget_responses, f->held);
}

static void
fjob_done(gw_tjob_t *j)
{
    free(j);
}

/* Drops the calls' answers: on the loop when they are small, else on the
 * thread pool (freeing a tree of a million nodes takes as long as building
 * it). Their budget bytes are given back once they are freed. */
static void
answers_free(agg_t *a)
{
    size_t n = a->route->agg.ncalls, held = 0;
    fjob_t *f = NULL;
    if (a->parsed >= BUILD_INLINE_PARSED)
        f = gw_calloc(1, sizeof(*f));
    for (size_t i = 0; i < n; i++) {
        call_rt_t *rt = &a->calls[i];
        json_t *refs[4] = {rt->answer, rt->value, rt->failed, rt->missing};
        for (size_t k = 0; k < 4; k++) {
            if (refs[k] == NULL)
                continue;
            if (f)
                f->refs[f->nrefs++] = refs[k];
            else
                json_decref(refs[k]);
        }
        if (rt->rbuf && f)
            f->bufs[f->nbufs++] = rt->rbuf;
        else
            free(rt->rbuf);
        held += rt->held;
    }
    if (f == NULL) {
        if (held)
            gw_budget_give(&gw_budget_responses, held);
        return;
    }
    f->held = held;
    f->job.run = fjob_run;
    f->job.done = fjob_done;
    gw_tpool_post(a->w->tport, &f->job, true);
}

/* Ends a: running exchanges are closed, answers dropped, the context goes
 * back to the cache. */
static void
agg_free(agg_t *a)
{
    while (a->running)
        xchg_free(a->running, false);
    evtimer_del(a->deadline);
    if (a->fill)
        event_del(a->fill); /* a fill_cb still due for this request */
    answers_free(a);
    a->parsed = a->passed = 0;
    for (size_t i = 0; i < a->route->agg.ncalls; i++) {
        free(a->calls[i].elem_done);
        gw_batch_plan_free(a->calls[i].plan);
    }
    /* zeroed here for the next request, only as far as this route used them */
    memset(a->calls, 0, a->route->agg.ncalls * sizeof(a->calls[0]));
    memset(a->answers, 0, a->route->agg.ncalls * sizeof(a->answers[0]));
    agg_cache_t *cache = cache_of(a->w);
    if (cache->naggs >= AGG_CACHE_MAX || a->w->stopping || a->out.cap > (1u << 20) || a->raws.cap > (1u << 20)) {
        agg_destroy(a);
        return;
    }
    a->next_free = cache->aggs;
    cache->aggs = a;
    cache->naggs++;
}

/* The thread pool built a's aggregate: send it, unless the request ended
 * meanwhile. */
static void
build_run(gw_tjob_t *j)
{
    agg_t *a = (agg_t *)((char *)j - offsetof(agg_t, bjob));
    if (!gw_tpool_cancelled(j))
        respond_build(a);
}

static void
build_done(gw_tjob_t *j)
{
    agg_t *a = (agg_t *)((char *)j - offsetof(agg_t, bjob));
    gw_config_t *cfg = a->cfg; /* after agg_free(), which reads the route */
    gw_conn_t *c = a->c;
    bool zombie = a->zombie;
    a->building = a->zombie = false;
    a->cfg = NULL;
    if (!zombie)
        respond_send(a);
    agg_free(a);
    gw_config_unref(cfg);
    if (!zombie)
        gw_conn_release(c);
}

/* After any event: start what became ready, and answer once the request is
 * decided (a is freed then, or handed to the thread pool to build a large
 * aggregate). */
static void
agg_progress(agg_t *a)
{
    if (a->building)
        return;
    if (!a->fatal)
        schedule(a);
    if (a->fatal) {
        /* fail fast: the answer is decided, the other calls are not needed */
        while (a->running)
            xchg_free(a->running, false);
        respond_error(a);
        agg_free(a);
    } else if (a->pending == 0) {
        if (a->parsed >= BUILD_INLINE_PARSED || a->passed >= BUILD_INLINE_RAW) {
            /* every call is over: nothing but a cancel touches a until build_done() */
            evtimer_del(a->deadline);
            a->building = true;
            a->cfg = gw_config_ref(gw_conn_config(a->c));
            a->bjob.run = build_run;
            a->bjob.done = build_done;
            gw_tpool_post(a->w->tport, &a->bjob, true);
            return;
        }
        respond_build(a);
        respond_send(a);
        agg_free(a);
    }
}

static void
agg_cancel(void *ctx)
{
    agg_t *a = ctx;
    if (a->building) {
        a->zombie = true; /* freed by build_done() */
        gw_tpool_cancel(&a->bjob);
        return;
    }
    agg_free(a);
}

static void
agg_drained(void *ctx)
{
    GW_UNUSED(ctx); /* the answer is queued whole */
}

static const gw_conn_async_t agg_ops = { agg_cancel, agg_drained, NULL };

static void
agg_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    agg_t *a = arg;
    gw_conn_t *c = a->c;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    gw_log_rl(GW_LOG_INFO, "aggregate %s: deadline of %d ms passed with %zu calls unfinished, request %s",
           a->route->pattern, a->route->agg.deadline_ms, a->pending, gw_conn_req(c)->request_id);
    cancel_all(a, GW_FAIL_TIMEOUT);
    agg_progress(a);
    gw_conn_release(c);
}

/* --- the response of an exchange ----------------------------------------- */

#define XCHG(r) ((xchg_t *)(r)->arg)

/* The final head (gw_resp skipped interim ones and checked the framing; a
 * Content-Length over max_response_bytes never gets here). */
static int
on_headers_complete(gw_resp_t *r)
{
    XCHG(r)->ex.status = r->status;
    return GW_OK;
}

/* Logs a refusal of the response budget or the thread pool's queue at most
 * once a second per worker, with the number refused since the last line. */
static void
refusal_log(agg_t *a, const gw_call_t *call, bool budget)
{
    agg_cache_t *cache = cache_of(a->w);
    uint64_t *at = budget ? &cache->budget_logged_s : &cache->queue_logged_s;
    unsigned *n = budget ? &cache->budget_refused : &cache->queue_refused;
    uint64_t now = gw_now_ms() / 1000;
    ++*n;
    if (now == *at)
        return;
    if (budget)
        gw_log(GW_LOG_WARN,
               "memory budget: the answer of backend %s for call %s does not fit in memory.response_body_bytes "
               "(%zu bytes, %zu in use); %u answers refused since the last report, request %s",
               call->backend->name, call->name, gw_budget_limit(&gw_budget_responses),
               gw_budget_used(&gw_budget_responses), *n, gw_conn_req(a->c)->request_id);
    else {
        gw_tpool_stats_t st;
        gw_tpool_stats(&st);
        gw_log(GW_LOG_WARN,
               "thread pool: thread_pool.max_queue (%u) answers wait to be parsed; the answer of backend %s for "
               "call %s is refused (queue_full); %u refused since the last report, request %s",
               st.max_queue, call->backend->name, call->name, *n, gw_conn_req(a->c)->request_id);
    }
    *at = now;
    *n = 0;
}

/* Makes room in x->body for len more bytes, taking what it grows by from
 * the response budget: the whole Content-Length at once when it is known,
 * else doubling (at most max_response_bytes). A buffer kept from an
 * earlier exchange is taken again first. False when the budget refuses. */
static bool
body_room(xchg_t *x, const gw_resp_t *r, size_t len)
{
    size_t need = x->blen + len; /* <= x->limit */
    size_t cap = x->bcap;
    if (need > cap) {
        if (r->content_length >= 0 && (uint64_t)r->content_length >= need)
            cap = (size_t)r->content_length; /* the whole declared body, at most max_response_bytes (gw_resp) */
        else
            cap = GW_MIN(GW_MAX(GW_MAX(need, cap * 2), 4096), GW_MAX(x->limit, need));
    }
    if (cap > x->bheld) {
        if (!gw_budget_take(&gw_budget_responses, cap - x->bheld)) {
            x->over_budget = true;
            return false;
        }
        x->bheld = cap;
    }
    if (cap > x->bcap) {
        x->body = gw_realloc(x->body, cap);
        x->bcap = cap;
    }
    return true;
}


/* Body bytes, within max_response_bytes (gw_resp counts them). */
static int
on_body(gw_resp_t *r, const char *at, size_t len)
{
    xchg_t *x = XCHG(r);
    if (x->ex.status > 299)
        return GW_OK; /* not kept: only its status matters */
    if (!body_room(x, r, len))
        return GW_ERR; /* gw_resp stops: GW_RESP_STOPPED, x->over_budget says why */
    memcpy(x->body + x->blen, at, len);
    x->blen += len;
    return GW_OK;
}

static const gw_resp_ops_t resp_ops = { .head = on_headers_complete, .body = on_body };

static void
ajob_run(gw_tjob_t *j)
{
    ajob_t *p = (ajob_t *)j;
    uint64_t t0 = gw_now_us();
    if (gw_tpool_cancelled(j))
        return;
    if (p->raw) {
        if (!gw_json_valid(p->body, p->len, &p->st, &p->vl))
            p->code = GW_FAIL_BAD_JSON;
        p->us = gw_now_us() - t0;
        return;
    }
    gw_json_meter_t m;
    json_error_t jerr;
    gw_json_meter_begin(&m, &gw_budget_responses, &j->cancelled);
    p->answer = json_loadb(p->body, p->len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (p->answer && !p->call->batch)          /* a batch call's elements are shaped once matched */
        p->shaped = shape(p->call, p->answer); /* NULL: nothing at target, the loop says so */
    gw_json_meter_end(&m);
    p->tree = m.used;
    if (m.refused || m.cancelled) { /* a tree cut short, or none */
        json_decref(p->shaped);
        json_decref(p->answer);
        p->shaped = p->answer = NULL;
        p->code = m.refused ? GW_FAIL_MEMORY_BUDGET : GW_FAIL_NONE;
    } else if (p->answer == NULL) {
        p->code = GW_FAIL_BAD_JSON;
        snprintf(p->why, sizeof(p->why), "%s at byte %d", jerr.text, jerr.position);
    }
    if (p->answer == NULL) {
        gw_budget_give(&gw_budget_responses, p->tree);
        p->tree = 0;
    }
    /* the text is not needed any more */
    free(p->body);
    p->body = NULL;
    gw_budget_give(&gw_budget_responses, p->held);
    p->held = 0;
    p->us = gw_now_us() - t0;
}

/* Frees p and what it still holds (worker thread: small things only). */
static void
ajob_free(ajob_t *p)
{
    json_decref(p->answer);
    json_decref(p->shaped);
    if (p->tree)
        gw_budget_give(&gw_budget_responses, p->tree);
    free(p->body);
    if (p->held)
        gw_budget_give(&gw_budget_responses, p->held);
    gw_config_unref(p->cfg);
    free(p);
}

/* A cancelled job's second trip: its trees and body are freed on the pool. */
static void
ajob_drop_run(gw_tjob_t *j)
{
    ajob_t *p = (ajob_t *)j;
    json_decref(p->answer);
    json_decref(p->shaped);
    p->answer = p->shaped = NULL;
    gw_budget_give(&gw_budget_responses, p->tree + p->held);
    p->tree = p->held = 0;
    free(p->body);
    p->body = NULL;
}

static void
ajob_drop_done(gw_tjob_t *j)
{
    ajob_free((ajob_t *)j);
}

/* An answer job is back: it ends its exchange, unless that ended first. */
static void
ajob_done(gw_tjob_t *j)
{
    ajob_t *p = (ajob_t *)j;
    xchg_t *x = p->x;
    if (x == NULL) {
        if (p->answer || p->shaped || p->body) {
            j->run = ajob_drop_run;
            j->done = ajob_drop_done;
            gw_tpool_post(j->port, j, true);
        } else {
            ajob_free(p);
        }
        return;
    }
    x->job = NULL;
    agg_t *a = x->a;
    gw_conn_t *c = a->c;
    call_rt_t *rt = &a->calls[x->call];
    gw_log_debug("backend %s: call %s: %zu bytes %s on the thread pool in %llu us, request %s",
                 p->call->backend->name, p->call->name, p->len, p->raw ? "checked" : "parsed",
                 (unsigned long long)p->us, gw_conn_req(c)->request_id);
    if (p->code == GW_FAIL_NONE && p->raw) {
        rt->raw = true;
        rt->rbuf = p->body;
        rt->raw_off = p->st;
        rt->raw_len = p->vl;
        rt->held += p->held;
        a->passed += p->len;
        p->body = NULL;
        p->held = 0;
        xchg_end(x, false, NULL, GW_FAIL_NONE);
    } else if (p->code == GW_FAIL_NONE) {
        json_t *v = p->answer;
        rt->held += p->tree;
        a->parsed += p->len;
        x->shaped = p->shaped;
        p->answer = p->shaped = NULL;
        p->tree = 0;
        xchg_end(x, false, v, GW_FAIL_NONE);
    } else {
        if (p->code == GW_FAIL_MEMORY_BUDGET)
            refusal_log(a, p->call, true);
        else
            gw_log_rl(GW_LOG_INFO, "backend %s: invalid JSON for call %s%s%s, request %s", p->call->backend->name,
                   p->call->name, p->raw ? "" : ": ", p->why, gw_conn_req(c)->request_id);
        xchg_end(x, false, NULL, p->code);
    }
    ajob_free(p);
    agg_progress(a);
    gw_conn_release(c);
}

/* Hands x's answer to the thread pool (raw: to check it for pass-through,
 * else to parse and shape it); its connection goes back to the pool now.
 * When the pool's queue is full the exchange ends with queue_full. */
static void
xchg_offload(xchg_t *x, bool reusable, bool raw)
{
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    ajob_t *p = gw_calloc(1, sizeof(*p));
    p->job.run = ajob_run;
    p->job.done = ajob_done;
    p->x = x;
    p->call = call;
    p->raw = raw;
    p->cfg = gw_config_ref(gw_conn_config(a->c));
    p->body = x->body; /* the job's now, with its budget bytes */
    p->len = x->blen;
    p->held = x->bheld;
    char *body = x->body;
    size_t bcap = x->bcap;
    x->body = NULL;
    x->blen = x->bcap = x->bheld = 0;
    if (gw_tpool_post(a->w->tport, &p->job, false) != GW_OK) {
        x->body = body;
        x->blen = p->len;
        x->bcap = bcap;
        x->bheld = p->held;
        gw_config_unref(p->cfg);
        free(p);
        refusal_log(a, call, false);
        xchg_end(x, reusable, NULL, GW_FAIL_POOL_FULL);
        return;
    }
    x->job = p;
    /* this try has its answer: no per-try timeout, no hedge; the call's timeout still runs */
    gw_xchg_detach(&x->ex, reusable);
}

/* The whole response is in: judge it, parse it, end the exchange. */
static void
xchg_finish(xchg_t *x, bool reusable)
{
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    if (x->ex.status < 200 || x->ex.status > 299) {
        gw_log_rl(GW_LOG_INFO, "backend %s: status %d for call %s, request %s", call->backend->name, x->ex.status,
               call->name, gw_conn_req(a->c)->request_id);
        xchg_end(x, reusable, NULL, GW_FAIL_BAD_STATUS);
        return;
    }
    json_t *v;
    if (x->blen == 0 && x->ex.status == 204) {
        v = json_null();
    } else if (!call->foreach && !call->batch && !call->target_path && !call->allow && !call->deny && !call->nrename &&
               a->route->agg.merge == GW_MERGE_GROUP && !(a->route->agg.read & (1ULL << x->call))) {
        /* Nothing reads or reshapes this answer: check it without building
         * a tree and copy its bytes into the aggregate (parsing three small
         * answers was a tenth of the CPU of a fan-out). */
        if (x->blen >= VALID_INLINE_MAX) {
            xchg_offload(x, reusable, true);
            return;
        }
        size_t st, vl;
        if (!gw_json_valid(x->body ? x->body : "", x->blen, &st, &vl)) {
            gw_log_rl(GW_LOG_INFO, "backend %s: invalid JSON for call %s, request %s", call->backend->name, call->name,
                   gw_conn_req(a->c)->request_id);
            xchg_end(x, reusable, NULL, GW_FAIL_BAD_JSON);
            return;
        }
        call_rt_t *rt = &a->calls[x->call];
        rt->raw = true;
        rt->raw_off = a->raws.len;
        rt->raw_len = vl;
        gw_tpl_buf_add(&a->raws, x->body + st, vl);
        a->passed += x->blen;
        xchg_end(x, reusable, NULL, GW_FAIL_NONE);
        return;
    } else {
        if (x->blen >= PARSE_INLINE_MAX) {
            xchg_offload(x, reusable, false);
            return;
        }
        json_error_t jerr;
        gw_json_meter_t m;
        gw_json_meter_begin(&m, &gw_budget_responses, NULL);
        v = json_loadb(x->body ? x->body : "", x->blen, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
        gw_json_meter_end(&m);
        if (v == NULL && m.refused) {
            gw_budget_give(&gw_budget_responses, m.used);
            refusal_log(a, call, true);
            xchg_end(x, false, NULL, GW_FAIL_MEMORY_BUDGET);
            return;
        }
        a->calls[x->call].held += m.used; /* given back with the answer (answers_free) */
        a->parsed += x->blen;
        if (v == NULL) {
            gw_log_rl(GW_LOG_INFO, "backend %s: invalid JSON for call %s: %s at byte %d, request %s",
                   call->backend->name, call->name, jerr.text, jerr.position, gw_conn_req(a->c)->request_id);
            xchg_end(x, reusable, NULL, GW_FAIL_BAD_JSON);
            return;
        }
    }
    xchg_end(x, reusable, v, GW_FAIL_NONE);
}

/* --- the exchange's callbacks ------------------------------------------- */

#define XC(ex) ((xchg_t *)(ex)->arg)

/* A try has its connection: what an earlier try read goes, the body
 * follows the head. */
static void
agg_xchg_begin(gw_xchg_t *ex, struct evbuffer *out)
{
    xchg_t *x = XC(ex);
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    x->blen = 0;
    x->over_budget = false;
    if (x->has_obody)
        evbuffer_add(out, x->obody.data, x->out_len);
    else if (call->forward_body && x->out_len &&
             evbuffer_add_buffer_reference(out, gw_conn_req(a->c)->body) != 0)
        /* By reference above, not a copy per call: the memory counted in
         * memory.request_body_bytes is the only copy (libevent keeps the
         * shared chains alive until both buffers let them go). A copy only
         * if libevent refuses. */
        evbuffer_add(out, evbuffer_pullup(gw_conn_req(a->c)->body, -1), x->out_len);
}

static void
agg_xchg_done(gw_xchg_t *ex, bool reusable)
{
    xchg_finish(XC(ex), reusable);
}

/* gw_resp refused the answer (logged by gw_exchange when invalid), or
 * on_body() stopped it: the call's code. */
static gw_fail_t
answer_refused(xchg_t *x)
{
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    gw_xchg_t *ex = &x->ex;
    ex->status = ex->rd.status; /* 0 when the head itself was refused */
    if (x->over_budget) {
        refusal_log(a, call, true);
        return GW_FAIL_MEMORY_BUDGET;
    }
    if (ex->rd.error == GW_RESP_TOO_LARGE && ex->status > 299) {
        /* the body of an error is never used: its status is the answer */
        gw_log_rl(GW_LOG_INFO, "backend %s: status %d for call %s (its body over max_response_bytes not read), "
               "request %s", call->backend->name, ex->status, call->name, gw_conn_req(a->c)->request_id);
        return GW_FAIL_BAD_STATUS;
    }
    if (ex->rd.error == GW_RESP_TOO_LARGE) {
        gw_log_rl(GW_LOG_INFO, "backend %s: response over max_response_bytes (%zu) for call %s, request %s",
               call->backend->name, x->limit, call->name, gw_conn_req(a->c)->request_id);
        return GW_FAIL_TOO_LARGE;
    }
    ex->status = 0; /* an invalid answer has no status worth reporting */
    return GW_FAIL_BAD_RESPONSE;
}

/* The try failed (gw_exchange resent on a stale connection already, and
 * logged connection failures): ended through xchg_end(), which retries
 * when allowed. */
static void
agg_xchg_fail(gw_xchg_t *ex, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int err)
{
    xchg_t *x = XC(ex);
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    if (cause == GW_XCHG_INVALID)
        code = answer_refused(x);
    else if (cause == GW_XCHG_START || cause == GW_XCHG_QUEUE)
        start_failed_log(a, call, code, err);
    else if (cause == GW_XCHG_TIMEOUT)
        gw_log_rl(GW_LOG_INFO, "backend %s%s%s: call %s timed out after %d ms while %s, request %s", call->backend->name,
               ex->sent ? " server " : "", ex->sent ? gw_xchg_server(ex) : "", call->name, call->timeout_ms,
               x->job ? "parsing the response on the thread pool" : doing, gw_conn_req(a->c)->request_id);
    xchg_end(x, false, NULL, code);
}

static void
agg_xchg_settle(void *sarg)
{
    agg_t *a = sarg;
    gw_conn_t *c = a->c;
    agg_progress(a);
    gw_conn_release(c);
}

/*
 * Retries and hedges are gw_exchange's (gw_xchg_end_try(), which xchg_end()
 * asks first). A hedge (the call's hedge_after_ms) is an exchange of its
 * own, the twin, with a copy of the request, that reports into its owner:
 * the first good answer of either ends the exchange (the hedge's own body
 * buffer holds it), the other is closed, never pooled.
 */
static gw_xchg_t *
agg_xchg_hedge(gw_xchg_t *ex)
{
    xchg_t *x = XC(ex);
    agg_t *a = x->a;
    const gw_call_t *call = call_of(a, x->call);
    xchg_t *h = xchg_new(a, x->call, x->item);
    h->limit = x->limit;
    gw_tpl_buf_add(&h->req, x->req.data, x->req.len);
    if (x->has_obody)
        gw_tpl_buf_add(&h->obody, x->obody.data, x->obody.len);
    h->has_obody = x->has_obody;
    h->out_len = x->out_len;
    gw_xchg_init(&h->ex, &xchg_ops, h, a, a->w, call->backend, call->name, ex->rid, ex->peer);
    h->ex.head = h->req.data;
    h->ex.head_len = h->req.len;
    return &h->ex;
}

static void
agg_xchg_discard(gw_xchg_t *ex, bool reusable)
{
    xchg_free(XC(ex), reusable);
}

static const gw_xchg_ops_t xchg_ops = {
    .resp = &resp_ops,
    .begin = agg_xchg_begin,
    .done = agg_xchg_done,
    .fail = agg_xchg_fail,
    .settle = agg_xchg_settle,
    .hedge = agg_xchg_hedge,
    .discard = agg_xchg_discard,
};

/* --- entry points -------------------------------------------------------- */

/* Arms a's deadline: a common timeout of the worker's base for its
 * duration when the base has one left (libevent allows 256), else a plain
 * timer. */
static void
deadline_add(agg_t *a, agg_cache_t *cache, int ms)
{
    for (unsigned k = 0; k < cache->ndeadlines; k++)
        if (cache->deadlines[k].ms == ms) {
            evtimer_add(a->deadline, cache->deadlines[k].tv);
            return;
        }
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    const struct timeval *t = NULL;
    if (cache->ndeadlines < DEADLINES_MAX)
        t = event_base_init_common_timeout(a->w->base, &tv);
    if (t == NULL) {
        evtimer_add(a->deadline, &tv);
        return;
    }
    cache->deadlines[cache->ndeadlines].ms = ms;
    cache->deadlines[cache->ndeadlines].tv = t;
    cache->ndeadlines++;
    evtimer_add(a->deadline, t);
}

void
gw_agg_start(gw_conn_t *c, const gw_match_t *m)
{
    gw_worker_t *w = gw_conn_worker(c);
    agg_cache_t *cache = cache_of(w);
    agg_t *a = cache->aggs;
    if (a) {
        cache->aggs = a->next_free;
        cache->naggs--;
        /* agg_free() left calls[] and answers[] of its route zeroed */
        a->running = NULL;
        a->fatal = 0;
        a->next_free = NULL;
    } else {
        a = gw_calloc(1, sizeof(agg_t));
        a->deadline = evtimer_new(w->base, agg_deadline_cb, a);
    }
    a->c = c;
    a->w = w;
    a->route = m->route;
    a->match = *m;
    a->pending = a->route->agg.ncalls;
    a->start_us = gw_now_us();
    a->age_ms = -1;
    a->deadline_us = a->start_us + (uint64_t)a->route->agg.deadline_ms * 1000u;
    a->out.len = a->hdrs.len = a->raws.len = 0;
    deadline_add(a, cache, a->route->agg.deadline_ms);
    gw_conn_begin_async(c, &agg_ops, a);
    agg_progress(a); /* may answer at once (every call failed to start) */
}

void
gw_agg_worker_free(gw_worker_t *w)
{
    agg_cache_t *cache = w->agg_cache;
    if (cache == NULL)
        return;
    while (cache->aggs) {
        agg_t *a = cache->aggs;
        cache->aggs = a->next_free;
        agg_destroy(a);
    }
    while (cache->xchgs) {
        xchg_t *x = cache->xchgs;
        cache->xchgs = x->next;
        xchg_destroy(x);
    }
    free(cache);
    w->agg_cache = NULL;
}
