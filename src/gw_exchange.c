/*
 * gw_exchange.c - one upstream exchange (see gw_exchange.h): connection,
 * tries, answer reading, stale-connection resend, timeouts, retries,
 * breaker and metrics, shared by aggregate calls and proxy routes.
 *
 * A try: xchg_try() picks the try's server (gw_cluster_pick), takes a
 * connection of its pool (or, every usable server being full, xchg_wait()
 * waits for the first of them to free one), queues the head (with the server's Host) and
 * lets the owner add the body (ops->begin), and sends. The answer
 * goes through gw_resp into the owner's callbacks. Upstream events become
 * one of ops->done or ops->fail; a pooled connection that the backend had
 * closed before any answer byte is first replaced by a new one (once per
 * exchange, idempotent replayable requests only), as nginx does.
 */
#include "gw_exchange.h"
#include "gw_breaker.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_http.h"
#include "gw_log.h"
#include "gw_metrics.h"
#include "gw_retry.h"
#include "gw_server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <llhttp.h>
#include <stdio.h>
#include <string.h>

/* The server of x's try, for log lines. */
#define SRV(x) ((x)->b->servers[(x)->target].label)

/* "call NAME: " before a log line's text when the exchange is a call's. */
#define LABEL(x) (x)->label ? "call " : "", (x)->label ? (x)->label : "", (x)->label ? ": " : ""

static void xchg_read_cb(gw_upstream_t *u, void *arg);
static void xchg_event_cb(gw_upstream_t *u, int what, void *arg);
static void xchg_write_cb(gw_upstream_t *u, void *arg);
static void xchg_wait_cb(gw_upstream_wait_t *wt, int status, void *arg);
static void xchg_timer_cb(evutil_socket_t fd, short what, void *arg);
static void xchg_rtimer_cb(evutil_socket_t fd, short what, void *arg);
static void xchg_htimer_cb(evutil_socket_t fd, short what, void *arg);
static void xchg_try_over(gw_xchg_t *x);

void
gw_xchg_init(gw_xchg_t *x, const gw_xchg_ops_t *ops, void *arg, void *sarg, gw_worker_t *w, const gw_backend_t *b,
             const char *label, const char *rid, const char *peer)
{
    x->ops = ops;
    x->arg = arg;
    x->sarg = sarg;
    x->w = w;
    x->b = b;
    x->label = label;
    x->rid = rid;
    x->peer = peer;
}

/* A code's name in log lines, as the route kind names it. */
static const char *
xchg_name(const gw_xchg_t *x, gw_fail_t code)
{
    return x->label ? gw_fail_name(code) : gw_fail_proxy_name(code);
}

/* --- where a try goes ------------------------------------------------------ */

const char *
gw_xchg_server(const gw_xchg_t *x)
{
    return SRV(x);
}

/* Gives the try's connection back (pooled when reusable) and takes the try
 * out of its server's in-flight count. Every path that lets go of x->u
 * goes through here. */
static void
xchg_drop_conn(gw_xchg_t *x, bool reusable)
{
    if (x->u) {
        gw_upstream_release(x->u, reusable);
        x->u = NULL;
    }
    if (x->inflight) {
        gw_cluster_inflight(&x->b->servers[x->target], -1);
        x->inflight = false;
    }
}

/*
 * Sends the request on a connection of server x->target (fresh: a new one,
 * never a pooled one) and marks that server tried. GW_OK; GW_AGAIN when its
 * max_connections are in use; GW_ERR when no socket could be made (errno
 * set).
 */
static int
xchg_send(gw_xchg_t *x, bool fresh)
{
    gw_upstream_t *u = NULL;
    int rc = gw_upstream_get(x->w, x->b, x->target, fresh, &u);
    if (rc != GW_OK)
        return rc;
    const gw_peer_t *srv = &x->b->servers[x->target];
    x->tried |= 1u << x->target;
    x->u = u;
    x->sent = true;
    x->srv_open = true;
    if (!x->inflight) { /* a stale connection's resend is counted once */
        gw_cluster_inflight(srv, 1);
        x->inflight = true;
    }
    x->got_bytes = x->done = false;
    x->status = 0;
    x->fail_code = GW_FAIL_NONE;
    gw_resp_init(&x->rd, x->ops->resp, x->arg, x->max_body, x->method == HTTP_HEAD);
    gw_upstream_setcb(u, xchg_read_cb, x->ops->drained ? xchg_write_cb : NULL, xchg_event_cb, x, x->low_water);
    struct evbuffer *out = gw_upstream_output(u);
    if (x->host_off > 0 && x->host_off <= x->head_len) {
        evbuffer_add(out, x->head, x->host_off);
        evbuffer_add(out, srv->host_header, strlen(srv->host_header));
        evbuffer_add(out, x->head + x->host_off, x->head_len - x->host_off);
    } else {
        evbuffer_add(out, x->head, x->head_len);
    }
    if (x->ops->begin)
        x->ops->begin(x, out);
    gw_upstream_send(u);
    return GW_OK;
}

/* The servers gw_cluster_pick() chooses from now: the usable primaries,
 * or the usable backups when no primary is usable (bit per index). */
static uint32_t
xchg_usable(const gw_backend_t *b, uint64_t now)
{
    uint32_t prim = 0, back = 0;
    for (unsigned k = 0; k < b->nservers; k++)
        if (gw_cluster_usable(&b->servers[k], now))
            *(b->servers[k].backup ? &back : &prim) |= 1u << k;
    return prim ? prim : back;
}

/*
 * A new try: picks its server (never one in x->tried while another usable
 * one is left) and sends on it; a server whose pool is full is passed over
 * for the next usable one with room (a full pool says nothing of its
 * health, and a call should not wait while another server has a free
 * connection). GW_FAIL_NONE; UNAVAILABLE when every usable server is full
 * (x->target: the first one picked, charged with the wait when its queue has room);
 * NO_HEALTHY_SERVER when no server is usable; CONNECT_FAILED when no
 * socket could be made (errno set).
 */
static gw_fail_t
xchg_try(gw_xchg_t *x, bool fresh)
{
    uint32_t full = 0;
    unsigned first = 0, si;
    uint64_t now = gw_now_ms();
    for (;;) {
        if (gw_cluster_pick(x->w, x->b, x->hash, x->has_hash, x->tried | full, now, &si) != GW_OK)
            return GW_FAIL_NO_HEALTHY_SERVER;
        if (full & (1u << si))
            break; /* every candidate left was full */
        if (full == 0)
            first = si;
        x->target = si;
        int rc = xchg_send(x, fresh);
        if (rc == GW_OK)
            return GW_FAIL_NONE;
        if (rc != GW_AGAIN)
            return GW_FAIL_CONNECT_FAILED;
        full |= 1u << si;
    }
    /* Every untried candidate is full: a usable server tried before (a
     * retry's) may still have room. */
    for (unsigned k = 0; k < x->b->nservers; k++) {
        if (!(x->tried & ~full & (1u << k)) || !gw_cluster_usable(&x->b->servers[k], now))
            continue;
        x->target = k;
        int rc = xchg_send(x, fresh);
        if (rc == GW_OK)
            return GW_FAIL_NONE;
        if (rc != GW_AGAIN)
            return GW_FAIL_CONNECT_FAILED;
        full |= 1u << k;
    }
    x->target = first;
    return GW_FAIL_UNAVAILABLE;
}

/*
 * Queues x's try for the first connection freed on any server it may take:
 * the usable candidates (xchg_usable), the untried ones among them when
 * there are (a retry still prefers another server, as gw_cluster_pick()
 * does), whatever the balance (a full pool breaks a hash's affinity at
 * once too: xchg_try). The call counts towards max_pending of x->target,
 * the server picked first, or of another of them whose queue has room.
 * expires_ms: when its queue_timeout_ms ends. GW_FAIL_NONE, or QUEUE_FULL.
 */
static gw_fail_t
xchg_wait(gw_xchg_t *x, uint64_t expires_ms)
{
    uint32_t servers = xchg_usable(x->b, gw_now_ms());
    if (servers & ~x->tried)
        servers &= ~x->tried;
    if (servers == 0) /* every server became unusable since it was picked (the checker's thread) */
        servers = 1u << x->target;
    if (gw_upstream_wait(x->w, x->b, servers, x->target, expires_ms, &x->wait, xchg_wait_cb, x) != GW_OK)
        return GW_FAIL_QUEUE_FULL;
    return GW_FAIL_NONE;
}

/* A try without a connection yet: send it, or queue it when the backend
 * has a queue. GW_FAIL_NONE, or why it could not (errno kept for
 * CONNECT_FAILED). */
static gw_fail_t
xchg_try_or_wait(gw_xchg_t *x)
{
    gw_fail_t code = xchg_try(x, false);
    if (code == GW_FAIL_UNAVAILABLE && x->b->max_pending > 0) {
        /* max_connections in use on every usable server: wait for the
         * first of them to free one (xchg_wait_cb) */
        code = xchg_wait(x, gw_now_ms() + (uint64_t)x->b->queue_timeout_ms);
        if (code == GW_FAIL_NONE && x->ops->queued)
            x->ops->queued(x, true);
    }
    return code;
}

/* Arms the per-try timeout of the try just started, when there is one. */
static void
xchg_arm_try(gw_xchg_t *x)
{
    const gw_retry_conf_t *rc = x->b->retry;
    if (!x->per_try || !rc->enabled || rc->per_try_timeout_ms <= 0)
        return;
    if (x->rtimer == NULL)
        x->rtimer = evtimer_new(x->w->base, xchg_rtimer_cb, x);
    x->backoff = false;
    struct timeval tv = { rc->per_try_timeout_ms / 1000, (rc->per_try_timeout_ms % 1000) * 1000 };
    evtimer_add(x->rtimer, &tv);
}

gw_fail_t
gw_xchg_start(gw_xchg_t *x)
{
    uint64_t now = gw_now_us();
    x->start_us = now;
    if (gw_breaker_admit(x->b, NULL) != GW_OK)
        return GW_FAIL_CIRCUIT_OPEN;
    x->admitted = x->b->breaker != NULL;
    gw_fail_t code = xchg_try_or_wait(x);
    if (code != GW_FAIL_NONE)
        return code;
    const gw_retry_conf_t *rc = x->b->retry;
    x->attempt = 1;
    x->end_us = now + (uint64_t)x->timeout_ms * 1000u;
    if (rc->counted || x->b->nservers > 1) { /* next-server retries take budget slots too */
        x->counted = true;
        gw_retry_request_begin(rc);
    }
    xchg_arm_try(x);
    if (x->hedge_ms > 0 && (!x->deadline_us || now + (uint64_t)x->hedge_ms * 1000u < x->deadline_us)) {
        if (x->htimer == NULL)
            x->htimer = evtimer_new(x->w->base, xchg_htimer_cb, x);
        struct timeval tv = { x->hedge_ms / 1000, (x->hedge_ms % 1000) * 1000 };
        evtimer_add(x->htimer, &tv);
    }
    /* No timer when the route's deadline comes first: it ends the call
     * anyway, with the same code. */
    if (x->deadline_us && x->end_us >= x->deadline_us)
        return GW_FAIL_NONE;
    if (x->timer == NULL)
        x->timer = evtimer_new(x->w->base, xchg_timer_cb, x);
    if (x->timeout_ms == x->b->timeout_ms) {
        evtimer_add(x->timer, gw_upstream_pool(x->w, x->b, 0)->call_timeout); /* a common timeout: O(1) */
    } else {
        struct timeval tv = { x->timeout_ms / 1000, (x->timeout_ms % 1000) * 1000 };
        evtimer_add(x->timer, &tv);
    }
    return GW_FAIL_NONE;
}

/* A copy of x's request on a new connection (a hedge): h is prepared with
 * gw_xchg_init() and its head; it holds a retry budget slot taken for it,
 * and the breaker admission got for it (admitted). Not counted for the
 * metrics (the call is x's). GW_FAIL_NONE, else h sent nothing. */
static gw_fail_t
xchg_start_copy(gw_xchg_t *h, const gw_xchg_t *x, bool admitted)
{
    h->method = x->method;
    h->max_body = x->max_body;
    h->low_water = x->low_water;
    h->timeout_ms = x->timeout_ms;
    h->deadline_us = x->deadline_us;
    h->per_try = x->per_try;
    h->end_us = x->end_us;
    h->tried = x->tried;
    h->hash = x->hash;
    h->has_hash = x->has_hash;
    h->host_off = x->host_off; /* h's head is a copy of x's */
    h->attempt = 1;
    h->slot = true;
    h->admitted = admitted;
    gw_fail_t code = xchg_try(h, true);
    if (code != GW_FAIL_NONE)
        return code;
    xchg_arm_try(h);
    return GW_FAIL_NONE;
}

/* --- the answer ------------------------------------------------------------ */

/*
 * The try failed: the code as the route kind reports it (gw_fail.h: an
 * aggregate call names a failed name resolution or TLS handshake
 * connect_failed and any cut answer truncated; a proxied request names a
 * cut head bad_response), the precise one kept for the retry rules
 * (gw_xchg_end_try()); connection failures and invalid answers logged
 * here, once for both kinds; then the owner hears it.
 */
static void
xchg_fail(gw_xchg_t *x, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int err)
{
    x->fail_code = code;
    x->fail_cause = cause;
    if (x->label && (code == GW_FAIL_RESOLVE_FAILED || code == GW_FAIL_TLS_FAILED))
        code = GW_FAIL_CONNECT_FAILED;
    else if (x->label && code == GW_FAIL_RESET)
        code = GW_FAIL_TRUNCATED;
    else if (!x->label && code == GW_FAIL_TRUNCATED && !x->rd.head_done)
        code = GW_FAIL_BAD_RESPONSE;
    if (cause == GW_XCHG_CONNECT || cause == GW_XCHG_BROKE) {
        gw_log_rl(GW_LOG_ERR, "backend %s server %s: %s%s%s while %s%s%s, client %s, request %s", x->b->name,
                  SRV(x), xchg_name(x, code), err ? ": " : "", err ? strerror(err) : "", doing,
                  x->label ? " for call " : "", x->label ? x->label : "", x->peer, x->rid);
        x->u->broken = true;
    } else if (cause == GW_XCHG_INVALID) {
        if (x->rd.error == GW_RESP_BAD)
            gw_log_rl(GW_LOG_ERR, "backend %s server %s: invalid response%s%s: %s", x->b->name, SRV(x),
                      x->label ? " for call " : "", x->label ? x->label : "", x->rd.why);
        x->u->broken = true; /* a retried status clears it (gw_xchg_retry_go) */
    }
    x->ops->fail(x, cause, code, doing, err);
}

static void
xchg_read_cb(gw_upstream_t *u, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_xchg_ops_t *ops = x->ops;
    void *sarg = x->sarg;
    struct evbuffer *in = gw_upstream_input(u);
    x->got_bytes = true;
    while (!x->done && evbuffer_get_length(in) > 0) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        size_t used;
        gw_resp_result_t rc = gw_resp_execute(&x->rd, v.iov_base, v.iov_len, &used);
        if (rc == GW_RESP_ERROR) {
            xchg_fail(x, GW_XCHG_INVALID, GW_FAIL_BAD_RESPONSE,
                      x->rd.head_done ? "reading response body from upstream" : "reading response header from upstream",
                      0);
            ops->settle(sarg);
            return;
        }
        evbuffer_drain(in, used);
        x->done = rc == GW_RESP_DONE;
    }
    if (x->done)
        ops->done(x, gw_resp_keep_alive(&x->rd) && evbuffer_get_length(in) == 0);
    else if (ops->flush && !ops->flush(x))
        gw_upstream_read(u, false); /* the owner resumes reading x->u */
    ops->settle(sarg);
}

static void
xchg_write_cb(gw_upstream_t *u, void *arg)
{
    gw_xchg_t *x = arg;
    void *sarg = x->sarg;
    const gw_xchg_ops_t *ops = x->ops;
    GW_UNUSED(u);
    ops->drained(x);
    ops->settle(sarg);
}

/* The connection broke before the whole answer: sent once more on a new
 * connection when a pooled one died before any answer byte and that is
 * safe, else the try fails. err: errno, or 0 for EOF. */
static void
xchg_broke(gw_xchg_t *x, int err)
{
    if (x->u->reused && !x->resent && !x->got_bytes && gw_http_idempotent(x->method) &&
        (x->ops->replayable == NULL || x->ops->replayable(x))) {
        gw_log_rl(GW_LOG_INFO,
                  "backend %s server %s: reused connection closed before a response (%s); retrying on a new one",
                  x->b->name, SRV(x), err ? strerror(err) : "EOF");
        x->resent = true;
        /* the same server, a new connection: still in its in-flight count */
        gw_upstream_release(x->u, false);
        x->u = NULL;
        int rc = xchg_send(x, true);
        if (rc == GW_AGAIN)
            xchg_fail(x, GW_XCHG_START, GW_FAIL_UNAVAILABLE, "retrying (max_connections reached)", 0);
        else if (rc != GW_OK)
            xchg_fail(x, GW_XCHG_START, GW_FAIL_CONNECT_FAILED, "connecting to upstream", errno);
        return;
    }
    xchg_fail(x, GW_XCHG_BROKE, x->got_bytes ? GW_FAIL_TRUNCATED : GW_FAIL_RESET,
              x->rd.head_done ? "reading response body from upstream" : "reading response header from upstream", err);
}

static void
xchg_event_cb(gw_upstream_t *u, int what, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_xchg_ops_t *ops = x->ops;
    void *sarg = x->sarg;
    int err = u->err;
    if (what & GW_UP_CONNECTED) {
        if (ops->drained == NULL)
            return;
        ops->drained(x); /* the connect wrote what was queued */
        ops->settle(sarg);
        return;
    }
    if (u->resolve_failed) {
        char doing[320];
        snprintf(doing, sizeof(doing), "resolving \"%s\": %s", x->b->servers[x->target].host_name,
                 gw_upstream_resolve_error(u));
        xchg_fail(x, GW_XCHG_CONNECT, GW_FAIL_RESOLVE_FAILED, doing, 0);
    } else if (what & GW_UP_TIMEOUT) {
        xchg_fail(x, GW_XCHG_CONNECT, GW_FAIL_TIMEOUT, "connecting to upstream", 0);
    } else if (gw_upstream_tls_failed(u)) {
        char why[256];
        gw_log_rl(GW_LOG_ERR, "backend %s server %s: TLS handshake failed: %s", x->b->name, SRV(x),
                  gw_upstream_tls_error(u, why, sizeof(why)));
        xchg_fail(x, GW_XCHG_CONNECT, GW_FAIL_TLS_FAILED, "handshaking with upstream", 0);
    } else if (!u->connected) {
        xchg_fail(x, GW_XCHG_CONNECT, GW_FAIL_CONNECT_FAILED, "connecting to upstream", err);
    } else if ((what & GW_UP_EOF) && gw_resp_eof(&x->rd) == GW_RESP_DONE) {
        x->done = true; /* a close-delimited body ends here */
        ops->done(x, false);
    } else {
        xchg_broke(x, (what & GW_UP_EOF) ? 0 : err);
    }
    ops->settle(sarg);
}

/* --- queue and timers ------------------------------------------------------ */

static void
xchg_wait_cb(gw_upstream_wait_t *wt, int status, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_xchg_ops_t *ops = x->ops;
    void *sarg = x->sarg;
    if (status != GW_OK) {
        xchg_fail(x, GW_XCHG_QUEUE, GW_FAIL_QUEUE_TIMEOUT, "waiting in the backend's queue (queue_timeout_ms)", 0);
        ops->settle(sarg);
        return;
    }
    x->target = wt->si; /* the first of its servers that freed a connection */
    int rc = xchg_send(x, false);
    if (rc == GW_AGAIN && xchg_wait(x, wt->expires_ms) == GW_FAIL_NONE) {
        ops->settle(sarg); /* taken by another: wait again, until the same expiry */
        return;
    }
    if (rc == GW_AGAIN)
        xchg_fail(x, GW_XCHG_QUEUE, GW_FAIL_QUEUE_FULL, "queueing for a connection (max_pending reached)", 0);
    else if (rc != GW_OK)
        xchg_fail(x, GW_XCHG_START, GW_FAIL_CONNECT_FAILED, "connecting to upstream", errno);
    else if (ops->queued)
        ops->queued(x, false);
    ops->settle(sarg);
}

/* What the exchange is doing now, for a timeout's log line (static). */
static const char *
xchg_doing(const gw_xchg_t *x)
{
    return x->u == NULL        ? "waiting in the backend's queue for a connection"
           : x->u->waiting     ? "resolving the backend's name"
           : !x->u->connected  ? "connecting to upstream"
           : x->rd.head_done   ? "reading response body from upstream"
           : x->got_bytes      ? "reading the response from upstream"
                               : "waiting for the response from upstream";
}

/* The call's timeout: final, whatever the try was doing. */
static void
xchg_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_xchg_ops_t *ops = x->ops;
    void *sarg = x->sarg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    x->final = true;
    if (x->u)
        x->u->broken = true;
    xchg_fail(x, GW_XCHG_TIMEOUT, GW_FAIL_TIMEOUT, xchg_doing(x), 0);
    ops->settle(sarg);
}

/* x->rtimer: the backoff sleep ended (send the next try), or the try in
 * flight ran past per_try_timeout_ms (it fails with "timeout"). */
static void
xchg_rtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_xchg_ops_t *ops = x->ops;
    void *sarg = x->sarg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    if (!x->backoff) {
        gw_log_rl(GW_LOG_INFO, "backend %s server %s: %s%s%stry %u passed per_try_timeout_ms (%d) while %s, request %s",
                  x->b->name, SRV(x), LABEL(x), x->attempt, x->b->retry->per_try_timeout_ms, xchg_doing(x), x->rid);
        if (x->u)
            x->u->broken = true;
        xchg_fail(x, GW_XCHG_TRY_TIMEOUT, GW_FAIL_TIMEOUT, xchg_doing(x), 0);
        ops->settle(sarg);
        return;
    }
    x->backoff = false;
    x->attempt++;
    x->sent = false;
    if (gw_breaker_admit(x->b, NULL) != GW_OK) {
        xchg_fail(x, GW_XCHG_START, GW_FAIL_CIRCUIT_OPEN, "retrying (its circuit breaker opened)", 0);
        ops->settle(sarg);
        return;
    }
    x->admitted = x->b->breaker != NULL;
    gw_fail_t code = xchg_try_or_wait(x);
    if (code == GW_FAIL_NONE)
        xchg_arm_try(x);
    else if (code == GW_FAIL_QUEUE_FULL)
        xchg_fail(x, GW_XCHG_QUEUE, code, "queueing for a connection (max_pending reached)", 0);
    else if (code == GW_FAIL_NO_HEALTHY_SERVER)
        xchg_fail(x, GW_XCHG_START, code, "retrying (no server of the backend is usable)", 0);
    else
        xchg_fail(x, GW_XCHG_START, code,
                  code == GW_FAIL_UNAVAILABLE ? "retrying (max_connections reached)" : "connecting to upstream",
                  code == GW_FAIL_UNAVAILABLE ? 0 : errno);
    ops->settle(sarg);
}

/* x->htimer: no answer byte after hedge_ms: a copy of the request goes out
 * on a new connection, when the breaker and the retry budget let it (else
 * x keeps waiting alone). Nothing of the call ends here: no settle. */
static void
xchg_htimer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_xchg_t *x = arg;
    const gw_retry_conf_t *rc = x->b->retry;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    if (x->twin || x->u == NULL || x->got_bytes || x->waiting_twin)
        return; /* answering, queued, or between tries: nothing to hedge */
    if (gw_breaker_admit(x->b, NULL) != GW_OK)
        return; /* its circuit opened meanwhile: no new try */
    if (!gw_retry_acquire(rc)) {
        if (x->b->breaker)
            gw_breaker_abandon(x->b);
        gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%sno hedge after %d ms: the retry budget is spent, request %s",
                  x->b->name, LABEL(x), x->hedge_ms, x->rid);
        return;
    }
    gw_xchg_t *h = x->ops->hedge(x);
    if (h == NULL) {
        gw_retry_release(rc);
        if (x->b->breaker)
            gw_breaker_abandon(x->b);
        return;
    }
    h->owner = x;
    x->twin = h;
    if (xchg_start_copy(h, x, x->b->breaker != NULL) != GW_FAIL_NONE) {
        x->ops->discard(h, false); /* x's try goes on alone */
        return;
    }
    x->tried |= 1u << h->target; /* a retry of x avoids the hedge's server too */
    gw_m_add(&x->w->m->backends[x->b->mid].hedges, 1);
    gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%sno answer after %d ms from server %s, hedged on server %s, request %s",
              x->b->name, LABEL(x), x->hedge_ms, SRV(x), SRV(h), x->rid);
}

/* --- retries --------------------------------------------------------------- */

/* Whether a failed try may be tried again, as far as its failure goes:
 * by the code reported or the precise one (a proxy's cut head is a
 * bad_response, and retried as the truncated answer it is). */
static bool
retried(const gw_xchg_t *x, gw_fail_t code)
{
    if (code == GW_FAIL_BAD_STATUS)
        return gw_retry_status(x->b->retry, x->status);
    return gw_fail_retried(code) || (x->fail_code != GW_FAIL_NONE && gw_fail_retried(x->fail_code));
}

/*
 * Without a "retry" section: whether the failed try goes to another server
 * at once (nginx's proxy_next_upstream error timeout): the backend has a
 * usable server not tried yet, this call tried fewer servers than it has,
 * the try could not connect (refused, connect timeout, TLS, name) or was
 * reset before any answer byte, and the method is idempotent. The call's
 * own timeout is final (x->final) and never gets here.
 */
static bool
next_server(const gw_xchg_t *x)
{
    const gw_backend_t *b = x->b;
    if (b->nservers < 2 || x->attempt >= b->nservers || !gw_http_idempotent(x->method) ||
        x->fail_code == GW_FAIL_NONE)
        return false;
    bool conn = x->fail_cause == GW_XCHG_CONNECT || x->fail_cause == GW_XCHG_TRY_TIMEOUT ||
                (x->fail_cause == GW_XCHG_BROKE && x->fail_code == GW_FAIL_RESET);
    if (!conn)
        return false;
    /* an untried server among those gw_cluster_pick() would choose from */
    return (xchg_usable(b, gw_now_ms()) & ~x->tried) != 0;
}

bool
gw_xchg_retry_decide(gw_xchg_t *x, gw_fail_t code, int err, bool replayable)
{
    const gw_retry_conf_t *rc = x->b->retry;
    if (x->slot) {
        gw_retry_release(rc);
        x->slot = false;
    }
    if (code == GW_FAIL_NONE || x->final || x->attempt == 0 || !replayable)
        return false;
    bool next = !rc->enabled;
    if (next ? !next_server(x)
             : x->attempt >= rc->attempts || !retried(x, code) || !gw_retry_method_ok(rc, x->method))
        return false;
    const char *name = xchg_name(x, code);
    int ms = next ? 0 : gw_retry_backoff_ms(rc, x->attempt);
    uint64_t wake = gw_now_us() + (uint64_t)ms * 1000u;
    if (wake >= x->end_us || (x->deadline_us && wake >= x->deadline_us)) {
        gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%s%s; no retry: a %d ms backoff would end after %s, request %s",
                  x->b->name, LABEL(x), name, ms, wake >= x->end_us ? "timeout_ms" : "the route's deadline", x->rid);
        return false;
    }
    if (!gw_retry_acquire(rc)) {
        gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%s%s; no retry: the retry budget is spent, request %s", x->b->name,
                  LABEL(x), name, x->rid);
        return false;
    }
    x->slot = true;
    x->retry_ms = ms;
    x->retry_code = code;
    char st[32] = "";
    if (code == GW_FAIL_BAD_STATUS)
        snprintf(st, sizeof(st), " (status %d)", x->status);
    if (next)
        gw_log_rl(GW_LOG_INFO, "backend %s server %s: %s%s%s%s%s%s; trying another server, request %s", x->b->name,
                  SRV(x), LABEL(x), name, err ? ": " : "", err ? strerror(err) : "", x->rid);
    else
        gw_log_rl(GW_LOG_INFO, "backend %s server %s: %s%s%s%s%s%s%s; retry %u of %u in %d ms, request %s",
                  x->b->name, SRV(x), LABEL(x), name, st, err ? ": " : "", err ? strerror(err) : "", x->attempt,
                  rc->attempts - 1, ms, x->rid);
    /* the breaker hears how this try went; the next one asks it again */
    gw_xchg_outcome(x, code, x->status);
    gw_m_add(&x->w->m->backends[x->b->mid].retries, 1);
    return true;
}

void
gw_xchg_retry_go(gw_xchg_t *x, bool reusable)
{
    gw_upstream_wait_cancel(&x->wait);
    if (x->u && !reusable)
        x->u->broken = x->retry_code != GW_FAIL_BAD_STATUS;
    xchg_drop_conn(x, reusable);
    if (x->rtimer == NULL)
        x->rtimer = evtimer_new(x->w->base, xchg_rtimer_cb, x);
    x->backoff = true;
    struct timeval tv = { x->retry_ms / 1000, (x->retry_ms % 1000) * 1000 };
    evtimer_add(x->rtimer, &tv);
}


gw_xchg_t *
gw_xchg_end_try(gw_xchg_t *x, gw_fail_t code, bool reusable)
{
    /* this try is over: the breaker hears how it went, a queued one leaves the queue */
    gw_xchg_outcome(x, code, x->status);
    xchg_try_over(x);
    if (x->owner) {
        gw_xchg_t *p = x->owner;
        if (code == GW_FAIL_NONE) {
            /* the hedge won: the owner's own try is closed, the answer is the hedge's */
            gw_log_rl(GW_LOG_INFO, "backend %s: the hedge%s%s answered first, request %s", x->b->name,
                      x->label ? " of call " : "", x->label ? x->label : "", x->rid);
            if (p->admitted) {
                gw_breaker_abandon(p->b); /* cancelled, not failed */
                p->admitted = false;
            }
            gw_xchg_detach(p, false);
            p->status = x->status;
            p->hedge_won = true;
            x->ops->discard(x, reusable);
            return p;
        }
        gw_log_rl(GW_LOG_INFO, "backend %s: the hedge%s%s failed: %s, request %s", x->b->name,
                  x->label ? " of call " : "", x->label ? x->label : "", xchg_name(x, code), x->rid);
        bool owner_failed = p->waiting_twin;
        int status = x->status;
        x->ops->discard(x, reusable);
        if (!owner_failed)
            return NULL; /* the owner's try goes on */
        p->waiting_twin = false;
        p->status = status;
        x = p;
        reusable = false;
    } else if (x->twin) {
        if (code == GW_FAIL_NONE || x->final) {
            x->ops->discard(x->twin, false); /* the hedge lost, or the call is over */
        } else {
            gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%s%s; its hedge goes on, request %s", x->b->name, LABEL(x),
                      xchg_name(x, code), x->rid);
            gw_xchg_detach(x, reusable);
            x->waiting_twin = true;
            return NULL;
        }
    }
    if (!gw_xchg_retry_decide(x, code, 0, x->ops->replayable == NULL || x->ops->replayable(x)))
        return x;
    gw_xchg_retry_go(x, reusable);
    return NULL;
}

void
gw_xchg_outcome(gw_xchg_t *x, gw_fail_t code, int status)
{
    if (x->srv_open) {
        x->srv_open = false;
        if (!gw_fail_local(code))
            gw_cluster_report(x->b, &x->b->servers[x->target], code, status, gw_now_ms());
    }
    if (!x->admitted)
        return;
    /* a backend's health: 4xx and oversized answers are not its failures (gw_fail.c) */
    if (x->sent)
        gw_breaker_done(x->b, gw_fail_backend_ok(code, status));
    else
        gw_breaker_abandon(x->b);
    x->admitted = false;
}

/* --- endings --------------------------------------------------------------- */

void
gw_xchg_detach(gw_xchg_t *x, bool reusable)
{
    gw_upstream_wait_cancel(&x->wait);
    xchg_drop_conn(x, reusable);
    if (x->rtimer)
        evtimer_del(x->rtimer);
    if (x->htimer)
        evtimer_del(x->htimer);
}

/* The try is over: the queue is left, the retry budget slot given back,
 * the per-try timer stopped; the connection stays. */
static void
xchg_try_over(gw_xchg_t *x)
{
    gw_upstream_wait_cancel(&x->wait);
    if (x->slot) {
        gw_retry_release(x->b->retry);
        x->slot = false;
    }
    if (x->rtimer)
        evtimer_del(x->rtimer);
}

void
gw_xchg_close(gw_xchg_t *x, bool reusable)
{
    if (x->start_us)
        gw_m_call(x->w->m, x->b->mid, x->ended ? x->end_code : GW_FAIL_CANCELLED, gw_now_us() - x->start_us);
    if (x->b) {
        const gw_retry_conf_t *rc = x->b->retry;
        if (x->slot)
            gw_retry_release(rc);
        if (x->counted)
            gw_retry_request_end(rc);
    }
    gw_upstream_wait_free(&x->wait); /* its extra places too */
    if (x->admitted) /* cancelled: deadline, fail fast, client gone */
        gw_breaker_abandon(x->b);
    xchg_drop_conn(x, reusable); /* a try still open is cancelled: its server hears nothing */
    if (x->twin)
        x->twin->owner = NULL;
    if (x->owner)
        x->owner->twin = NULL;
    struct event *timer = x->timer, *rtimer = x->rtimer, *htimer = x->htimer;
    if (timer)
        evtimer_del(timer);
    if (rtimer)
        evtimer_del(rtimer);
    if (htimer)
        evtimer_del(htimer);
    memset(x, 0, sizeof(*x));
    x->timer = timer;
    x->rtimer = rtimer;
    x->htimer = htimer;
}

void
gw_xchg_destroy(gw_xchg_t *x)
{
    gw_upstream_wait_free(&x->wait);
    if (x->timer)
        event_free(x->timer);
    if (x->rtimer)
        event_free(x->rtimer);
    if (x->htimer)
        event_free(x->htimer);
    x->timer = x->rtimer = x->htimer = NULL;
}
