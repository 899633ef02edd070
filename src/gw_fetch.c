/*
 * gw_fetch.c - the cache's upstream requests (see gw_fetch.h).
 *
 * A fetch is the owner of one gw_exchange, as gw_agg.c's call exchange is,
 * with what the cache needs of the answer: its status, its body (bounded by
 * the backend's max_response_bytes, its bytes taken from
 * memory.response_body_bytes while it is read), and the Cache-Control and
 * Vary fields of its head. Its life: fetch_start() (from a lookup that got
 * a flight), then the loop calls back until the exchange ends (done or
 * fail, after its retries); the outcome goes to gw_cache_flight_done(),
 * which stores it and hands it to the waiters, and the fetch is freed in
 * ops->settle, the last thing of the entry point. Its exchange picks each
 * try's server as the call's would (the hash of the request that started
 * it, the next server after a failed connection). A large 2xx body is
 * checked on the thread pool first (the fetch waits for it, its
 * connection back in the pool).
 */
#include "gw_fetch.h"

#include "gw_budget.h"
#include "gw_config.h"
#include "gw_exchange.h"
#include "gw_json.h"
#include "gw_log.h"
#include "gw_server.h"
#include "gw_template.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Bodies checked to be JSON on the loop below this (gw_json_valid: 190
 * MB/s at worst, so under 2 ms), on the thread pool from it. */
#define VALID_INLINE_MAX (256 * 1024)
/* The Cache-Control and Vary values kept of a head; longer ones are taken
 * as no-store. */
#define FIELD_MAX 512

typedef struct fetch_s fetch_t;

struct fetch_s {
    gw_xchg_t ex;
    gw_tjob_t job; /* the JSON check on the thread pool */
    gw_worker_t *w;
    gw_gen_t *gen; /* a reference: the call, its backend and the pools live in it */
    const gw_call_t *call;
    gw_cache_flight_t *flight; /* NULL once ended */
    char *req;                 /* the head, then the body */
    size_t head_len, req_len;
    char rid[72], peer[64];
    /* the answer */
    char *body;
    size_t blen, bcap, held; /* held: gw_budget_responses bytes of body */
    bool over_budget;
    char fname[16]; /* the current field's name (its start) */
    size_t fnlen;
    bool after_value;
    int field; /* 1: Cache-Control, 2: Vary, 0: other */
    char cc[FIELD_MAX], vary[FIELD_MAX];
    size_t cclen, varylen;
    bool too_long;
    int status;           /* the answer's, kept past the exchange's close */
    bool job_out;         /* the check runs on the pool */
    bool valid;           /* its result */
    bool finished;        /* the exchange is closed: free at settle */
    bool stopped;         /* the worker stopped meanwhile: the job frees it */
    fetch_t *next, *prev; /* the worker's */
};

/* What a worker keeps: its fetches and a buffer for keys. */
typedef struct {
    fetch_t *fetches;
    gw_tpl_buf_t key;
} fetch_worker_t;

static const gw_xchg_ops_t fetch_ops;
static const gw_resp_ops_t fetch_resp_ops;

static fetch_worker_t *
worker_of(gw_worker_t *w)
{
    if (w->cache_fetches == NULL)
        w->cache_fetches = gw_calloc(1, sizeof(fetch_worker_t));
    return w->cache_fetches;
}

static void
fetch_free(fetch_t *f)
{
    fetch_worker_t *fw = worker_of(f->w);
    if (f->prev)
        f->prev->next = f->next;
    else
        fw->fetches = f->next;
    if (f->next)
        f->next->prev = f->prev;
    gw_xchg_destroy(&f->ex);
    if (f->held)
        gw_budget_give(&gw_budget_responses, f->held);
    free(f->body);
    free(f->req);
    gw_server_gen_unref(f->w, f->gen);
    free(f);
}

/* --- judging the answer ------------------------------------------------------- */

/* The number after "name=" in a Cache-Control directive at p (len bytes), or -1. */
static long long
directive_num(const char *p, size_t len, const char *name)
{
    size_t n = strlen(name);
    if (len <= n || strncasecmp(p, name, n) != 0 || p[n] != '=')
        return -1;
    long long v = 0;
    size_t i = n + 1;
    if (i < len && p[i] == '"')
        i++;
    if (i >= len || p[i] < '0' || p[i] > '9')
        return -1;
    for (; i < len && p[i] >= '0' && p[i] <= '9'; i++)
        v = v < 100000000 ? v * 10 + (p[i] - '0') : v; /* capped: years are plenty */
    return v;
}

/*
 * Whether the answer may be stored, and for how long it is fresh (*ttl_ms,
 * the call's ttl, shortened by max-age or s-maxage when the call honours
 * Cache-Control). no-store, private and no-cache are never stored,
 * whatever honor_cache_control says: they say the answer is not for
 * another request.
 */
static bool
cacheable(const fetch_t *f, const gw_cache_conf_t *conf, int *ttl_ms)
{
    int st = f->status;
    if (!conf->cache || f->too_long || (st != 200 && st != 203 && st != 204))
        return false;
    for (size_t i = 0; i < f->varylen; i++)
        if (f->vary[i] == '*')
            return false;
    *ttl_ms = conf->ttl_ms;
    long long max_age = -1, s_maxage = -1;
    const char *p = f->cc, *end = f->cc + f->cclen;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        const char *q = p;
        while (q < end && *q != ',')
            q++;
        size_t len = (size_t)(q - p);
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if ((len == 8 && strncasecmp(p, "no-store", 8) == 0) ||
            (len >= 7 && strncasecmp(p, "private", 7) == 0 && (len == 7 || p[7] == '=')) ||
            (len >= 8 && strncasecmp(p, "no-cache", 8) == 0 && (len == 8 || p[8] == '=')))
            return false;
        long long v;
        if ((v = directive_num(p, len, "max-age")) >= 0)
            max_age = v;
        if ((v = directive_num(p, len, "s-maxage")) >= 0)
            s_maxage = v;
        p = q;
    }
    long long limit = s_maxage >= 0 ? s_maxage : max_age; /* a shared cache reads s-maxage first */
    if (conf->honor_cache_control && limit >= 0 && limit * 1000 < *ttl_ms)
        *ttl_ms = (int)(limit * 1000);
    return *ttl_ms > 0 || conf->swr_ms > 0 || conf->sie_ms > 0;
}

/* The fetch's outcome goes to its flight (and so to the cache and every
 * waiter). */
static void
fetch_deliver(fetch_t *f, gw_fail_t code)
{
    gw_cache_flight_t *fl = f->flight;
    if (fl == NULL)
        return;
    f->flight = NULL;
    if (code != GW_FAIL_NONE) {
        gw_cache_flight_done(fl, NULL, false, code, f->status);
        return;
    }
    const gw_cache_conf_t *conf = gw_cache_scope_conf(gw_cache_flight_scope(fl));
    int ttl = 0;
    bool store = cacheable(f, conf, &ttl);
    uint64_t now = gw_now_ms();
    gw_cache_val_t *v = gw_cache_val_new(f->status, f->body, f->blen, now);
    f->body = NULL;
    f->blen = f->bcap = 0;
    if (f->held) /* the bytes are the cache's now (cache.max_bytes), or the waiters' copies' */
        gw_budget_give(&gw_budget_responses, f->held);
    f->held = 0;
    v->fresh_ms = now + (uint64_t)ttl;
    v->swr_ms = v->fresh_ms + (uint64_t)conf->swr_ms;
    v->sie_ms = v->fresh_ms + (uint64_t)conf->sie_ms;
    gw_cache_flight_done(fl, v, store, GW_FAIL_NONE, f->status);
}

static void
fetch_job_run(gw_tjob_t *j)
{
    fetch_t *f = (fetch_t *)((char *)j - offsetof(fetch_t, job));
    size_t st, vl;
    if (!gw_tpool_cancelled(j))
        f->valid = gw_json_valid(f->body, f->blen, &st, &vl);
}

static void
fetch_job_done(gw_tjob_t *j)
{
    fetch_t *f = (fetch_t *)((char *)j - offsetof(fetch_t, job));
    f->job_out = false;
    if (!f->stopped) {
        if (!f->valid)
            gw_log_rl(GW_LOG_INFO, "backend %s: invalid JSON for call %s (shared request), request %s",
                      f->call->backend->name, f->call->name, f->rid);
        fetch_deliver(f, f->valid ? GW_FAIL_NONE : GW_FAIL_BAD_JSON);
    }
    fetch_free(f);
}

/* The exchange of f ended with code (after its retries): the answer is
 * checked, then delivered. */
static void
fetch_end(fetch_t *f, gw_fail_t code, bool reusable)
{
    if (gw_xchg_end_try(&f->ex, code, reusable) == NULL)
        return;               /* retried */
    f->status = f->ex.status; /* the close clears it */
    gw_xchg_ended(&f->ex, code);
    gw_xchg_close(&f->ex, reusable);
    f->finished = true;
    if (code == GW_FAIL_NONE && f->status != 204 && f->blen >= VALID_INLINE_MAX) {
        f->job.run = fetch_job_run;
        f->job.done = fetch_job_done;
        if (gw_tpool_post(f->w->tport, &f->job, false) == GW_OK) {
            f->job_out = true;
            return;
        }
        code = GW_FAIL_POOL_FULL;
    } else if (code == GW_FAIL_NONE && !(f->status == 204 && f->blen == 0)) {
        size_t st, vl;
        if (!gw_json_valid(f->body ? f->body : "", f->blen, &st, &vl)) {
            gw_log_rl(GW_LOG_INFO, "backend %s: invalid JSON for call %s (shared request), request %s",
                      f->call->backend->name, f->call->name, f->rid);
            code = GW_FAIL_BAD_JSON;
        }
    }
    fetch_deliver(f, code);
}

/* --- the exchange's callbacks ---------------------------------------------------- */

#define FX(x) ((fetch_t *)(x)->arg)

static void
fetch_begin(gw_xchg_t *x, struct evbuffer *out)
{
    fetch_t *f = FX(x);
    f->blen = 0;
    f->over_budget = false;
    f->cclen = f->varylen = 0;
    f->too_long = false;
    f->fnlen = 0;
    f->after_value = false;
    f->field = 0;
    if (f->req_len > f->head_len)
        evbuffer_add(out, f->req + f->head_len, f->req_len - f->head_len);
}

static void
fetch_done(gw_xchg_t *x, bool reusable)
{
    fetch_t *f = FX(x);
    if (x->status < 200 || x->status > 299) {
        gw_log_rl(GW_LOG_INFO, "backend %s: status %d for call %s (shared request), request %s", f->call->backend->name,
                  x->status, f->call->name, f->rid);
        fetch_end(f, GW_FAIL_BAD_STATUS, reusable);
        return;
    }
    fetch_end(f, GW_FAIL_NONE, reusable);
}

static void
fetch_fail(gw_xchg_t *x, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int err)
{
    fetch_t *f = FX(x);
    GW_UNUSED(err);
    if (cause == GW_XCHG_INVALID) {
        x->status = x->rd.status;
        if (f->over_budget)
            code = GW_FAIL_MEMORY_BUDGET;
        else if (x->rd.error == GW_RESP_TOO_LARGE)
            code = x->status > 299 ? GW_FAIL_BAD_STATUS : GW_FAIL_TOO_LARGE;
        else
            x->status = 0;
    }
    gw_log_rl(GW_LOG_INFO, "backend %s%s%s: call %s (shared request) failed: %s while %s, request %s",
              f->call->backend->name, x->sent ? " server " : "", x->sent ? gw_xchg_server(x) : "", f->call->name,
              gw_fail_name(code), doing ? doing : "sending", f->rid);
    fetch_end(f, code, false);
}

static void
fetch_settle(void *sarg)
{
    fetch_t *f = sarg;
    if (f->finished && !f->job_out)
        fetch_free(f);
}

static const gw_xchg_ops_t fetch_ops = {
    .resp = &fetch_resp_ops,
    .begin = fetch_begin,
    .done = fetch_done,
    .fail = fetch_fail,
    .settle = fetch_settle,
};

/* --- the answer's head and body ---------------------------------------------------- */

#define FR(r) ((fetch_t *)(r)->arg)

static int
fetch_head(gw_resp_t *r)
{
    FR(r)->ex.status = r->status;
    return GW_OK;
}

static int
fetch_field(gw_resp_t *r, const char *at, size_t len)
{
    fetch_t *f = FR(r);
    if (f->after_value) {
        f->fnlen = 0;
        f->after_value = false;
    }
    size_t n = GW_MIN(len, sizeof(f->fname) - f->fnlen);
    memcpy(f->fname + f->fnlen, at, n);
    f->fnlen += len; /* the true length: a longer name is none of ours */
    return GW_OK;
}

static int
fetch_value(gw_resp_t *r, const char *at, size_t len)
{
    fetch_t *f = FR(r);
    if (!f->after_value) {
        f->after_value = true;
        f->field = 0;
        if (f->fnlen == 13 && strncasecmp(f->fname, "cache-control", 13) == 0)
            f->field = 1;
        else if (f->fnlen == 4 && strncasecmp(f->fname, "vary", 4) == 0)
            f->field = 2;
        if (f->field) { /* several fields of a name are one list */
            char *buf = f->field == 1 ? f->cc : f->vary;
            size_t *blen = f->field == 1 ? &f->cclen : &f->varylen;
            if (*blen && *blen < FIELD_MAX)
                buf[(*blen)++] = ',';
        }
    }
    if (f->field == 0)
        return GW_OK;
    char *buf = f->field == 1 ? f->cc : f->vary;
    size_t *blen = f->field == 1 ? &f->cclen : &f->varylen;
    if (*blen + len > FIELD_MAX) {
        f->too_long = true; /* not understood: not stored */
        return GW_OK;
    }
    memcpy(buf + *blen, at, len);
    *blen += len;
    return GW_OK;
}

static int
fetch_value_done(gw_resp_t *r)
{
    FR(r)->after_value = true;
    return GW_OK;
}

static void
fetch_reset(gw_resp_t *r)
{
    fetch_t *f = FR(r);
    f->cclen = f->varylen = 0;
    f->too_long = false;
    f->fnlen = 0;
    f->after_value = false;
}

static int
fetch_body(gw_resp_t *r, const char *at, size_t len)
{
    fetch_t *f = FR(r);
    if (f->ex.status > 299)
        return GW_OK; /* not kept: only its status matters */
    size_t need = f->blen + len;
    if (need > f->bcap) {
        size_t cap = r->content_length >= 0 && (uint64_t)r->content_length >= need
                         ? (size_t)r->content_length
                         : GW_MAX(GW_MAX(need, f->bcap * 2), (size_t)4096);
        cap = GW_MIN(cap, GW_MAX(f->call->backend->max_response_bytes, need));
        if (cap > f->held) {
            if (!gw_budget_take(&gw_budget_responses, cap - f->held)) {
                f->over_budget = true;
                return GW_ERR;
            }
            f->held = cap;
        }
        f->body = gw_realloc(f->body, cap);
        f->bcap = cap;
    }
    memcpy(f->body + f->blen, at, len);
    f->blen += len;
    return GW_OK;
}

static const gw_resp_ops_t fetch_resp_ops = {.head = fetch_head,
                                             .body = fetch_body,
                                             .field = fetch_field,
                                             .value = fetch_value,
                                             .value_done = fetch_value_done,
                                             .reset = fetch_reset};

/* --- entry points ----------------------------------------------------------------- */

static void
fetch_start(gw_worker_t *w, const gw_call_t *call, gw_cache_flight_t *fl, const gw_fetch_req_t *rq)
{
    fetch_worker_t *fw = worker_of(w);
    fetch_t *f = gw_calloc(1, sizeof(*f));
    f->w = w;
    f->gen = gw_server_gen_ref(w);
    f->call = call;
    f->flight = fl;
    f->req_len = rq->head_len + rq->body_len;
    f->head_len = rq->head_len;
    f->req = gw_malloc(f->req_len + 1);
    memcpy(f->req, rq->head, rq->head_len);
    if (rq->body_len)
        memcpy(f->req + rq->head_len, rq->body, rq->body_len);
    snprintf(f->rid, sizeof(f->rid), "%s", rq->rid ? rq->rid : "-");
    snprintf(f->peer, sizeof(f->peer), "%s", rq->peer ? rq->peer : "-");
    f->next = fw->fetches;
    if (fw->fetches)
        fw->fetches->prev = f;
    fw->fetches = f;
    gw_xchg_t *x = &f->ex;
    gw_xchg_init(x, &fetch_ops, f, f, w, call->backend, call->name, f->rid, f->peer);
    x->head = f->req;
    x->head_len = rq->head_len;
    x->host_off = rq->host_off;
    x->hash = rq->hash;
    x->has_hash = rq->has_hash;
    x->method = call->method;
    x->max_body = call->backend->max_response_bytes;
    x->timeout_ms = call->timeout_ms;
    x->deadline_us = 0; /* not one request's: only the call's timeout */
    x->per_try = true;
    gw_fail_t code = gw_xchg_start(x);
    if (code == GW_FAIL_NONE)
        return;
    gw_log_rl(GW_LOG_INFO, "backend %s: call %s (shared request) could not start: %s, request %s", call->backend->name,
              call->name, gw_fail_name(code), f->rid);
    gw_xchg_end_try(x, code, false); /* never retried: nothing was sent */
    f->status = 0;
    gw_xchg_ended(x, code);
    gw_xchg_close(x, false);
    fetch_deliver(f, code); /* the waiters hear it through their ports, never from in here */
    fetch_free(f);
}

gw_cache_result_t
gw_fetch_lookup(gw_worker_t *w, const gw_call_t *call, const gw_fetch_req_t *rq, gw_cache_ask_t *ask)
{
    fetch_worker_t *fw = worker_of(w);
    gw_cache_key(&fw->key, rq->head, rq->head_len, rq->body, rq->body_len);
    gw_cache_result_t res = gw_cache_lookup(call->cache, fw->key.data, fw->key.len, gw_now_ms(), ask);
    if (ask->flight)
        fetch_start(w, call, ask->flight, rq);
    return res;
}

void
gw_fetch_worker_stop(gw_worker_t *w)
{
    fetch_worker_t *fw = w->cache_fetches;
    if (fw == NULL)
        return;
    fetch_t *f = fw->fetches;
    while (f) {
        fetch_t *next = f->next;
        if (!f->finished) {
            gw_xchg_ended(&f->ex, GW_FAIL_CANCELLED);
            gw_xchg_close(&f->ex, false);
            f->finished = true;
        }
        fetch_deliver(f, GW_FAIL_UNAVAILABLE);
        if (f->job_out) {
            f->stopped = true; /* freed when its job is back (gw_tport_free waits for it) */
            gw_tpool_cancel(&f->job);
        } else {
            fetch_free(f);
        }
        f = next;
    }
}

void
gw_fetch_worker_free(gw_worker_t *w)
{
    fetch_worker_t *fw = w->cache_fetches;
    if (fw == NULL)
        return;
    gw_tpl_buf_free(&fw->key);
    free(fw);
    w->cache_fetches = NULL;
}
