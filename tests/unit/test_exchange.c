/* Unit tests for src/gw_exchange.c, driven without a client connection:
 * a scripted backend on a loopback listener of the same event loop, and a
 * test owner that keeps the exchange's contract (judges each answer,
 * hands every try's end to gw_xchg_end_try(), closes what it returns).
 * Covered: an answer and the pooled connection's reuse; the resend on a
 * stale pooled connection (once, idempotent methods only) and how each
 * route kind names the failure; connect failures retried up to attempts;
 * a retried status on a reused connection; per-try and call timeouts; a
 * hedge that answers first; the wait queue, over one server and over two
 * (the first server to free a connection serves the waiters; a waiter
 * that leaves leaves every queue; an ejected server's free connection is
 * not taken); settle after every entry point. The route kinds' own behaviour runs in tests/integration/. */
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_exchange.h"
#include "gw_metrics.h"
#include "gw_server.h"
#include "gw_test.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char err[2048];
static struct event_base *base;
static gw_worker_t worker;

/* Once: the loop and the metrics live as long as the program. */
static void
loop_init(void)
{
    if (base == NULL) {
        base = event_base_new();
        gw_metrics_init(1);
    }
}

/* --- the scripted backend ------------------------------------------------ */

typedef enum {
    B_OK,   /* 200 "ok", keep-alive */
    B_503,  /* 503, empty body, keep-alive */
    B_DROP, /* closes the connection without an answer */
    B_HOLD, /* never answers */
    B_SLOW  /* 200 "slow" after 1.5 s: far behind a hedge sent after 30 ms, however loaded the machine */
} beh_t;

#define SCONNS 32
static beh_t script[16];
static int nscript, next_beh, accepted, requests;
static struct bufferevent *sconns[SCONNS];
static struct evconnlistener *sfrom[SCONNS]; /* the listener that accepted each */
static struct evconnlistener *hold_listener; /* every request of its connections is held (B_HOLD) */
static struct event *slow_ev[SCONNS];
static struct evconnlistener *listener;

static void
sconn_free(int k)
{
    if (slow_ev[k]) {
        event_free(slow_ev[k]);
        slow_ev[k] = NULL;
    }
    if (sconns[k]) {
        bufferevent_free(sconns[k]);
        sconns[k] = NULL;
    }
}

static int
sconn_index(struct bufferevent *bev)
{
    for (int k = 0; k < SCONNS; k++)
        if (sconns[k] == bev)
            return k;
    return -1;
}

static void
slow_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(fd);
    GW_UNUSED(what);
    int k = (int)(intptr_t)arg;
    if (sconns[k])
        evbuffer_add_printf(bufferevent_get_output(sconns[k]), "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow");
}

static void
srv_read(struct bufferevent *bev, void *arg)
{
    GW_UNUSED(arg);
    struct evbuffer *in = bufferevent_get_input(bev);
    struct evbuffer *out = bufferevent_get_output(bev);
    for (;;) {
        struct evbuffer_ptr p = evbuffer_search(in, "\r\n\r\n", 4, NULL);
        if (p.pos < 0)
            return;
        evbuffer_drain(in, (size_t)p.pos + 4);
        requests++;
        int k = sconn_index(bev);
        beh_t b = hold_listener && sfrom[k] == hold_listener ? B_HOLD : next_beh < nscript ? script[next_beh++] : B_OK;
        switch (b) {
        case B_OK:
            evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            break;
        case B_503:
            evbuffer_add_printf(out, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            break;
        case B_DROP:
            sconn_free(k);
            return;
        case B_HOLD:
            break;
        case B_SLOW: {
            struct timeval tv = { 1, 500 * 1000 };
            slow_ev[k] = evtimer_new(base, slow_cb, (void *)(intptr_t)k);
            evtimer_add(slow_ev[k], &tv);
            break;
        }
        }
    }
}

static void
srv_event(struct bufferevent *bev, short what, void *arg)
{
    GW_UNUSED(what);
    GW_UNUSED(arg);
    int k = sconn_index(bev);
    if (k >= 0)
        sconn_free(k);
}

static void
srv_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len, void *arg)
{
    GW_UNUSED(sa);
    GW_UNUSED(len);
    GW_UNUSED(arg);
    accepted++;
    for (int k = 0; k < SCONNS; k++) {
        if (sconns[k] == NULL) {
            sconns[k] = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
            sfrom[k] = l;
            bufferevent_setcb(sconns[k], srv_read, NULL, srv_event, NULL);
            bufferevent_enable(sconns[k], EV_READ);
            return;
        }
    }
    close(fd);
}

/* Starts the backend on a free loopback port; the port. */
static int
backend_start(void)
{
    loop_init();
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    listener = evconnlistener_new_bind(base, srv_accept, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 16,
                                       (struct sockaddr *)&sin, sizeof(sin));
    CHECK(listener != NULL);
    socklen_t sl = sizeof(sin);
    getsockname(evconnlistener_get_fd(listener), (struct sockaddr *)&sin, &sl);
    return ntohs(sin.sin_port);
}

/* A loopback port nobody listens on. */
static int
closed_port(void)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    socklen_t sl = sizeof(sin);
    bind(fd, (struct sockaddr *)&sin, sizeof(sin));
    getsockname(fd, (struct sockaddr *)&sin, &sl);
    close(fd);
    return ntohs(sin.sin_port);
}

/* --- the test owner ------------------------------------------------------ */

typedef struct {
    gw_xchg_t ex;
    bool used;
    int status, dones, fails, queued_on, queued_off;
    char body[16];
    size_t blen;
    gw_xchg_cause_t cause; /* of the last failure */
    gw_fail_t code;
    /* how the call ended */
    bool finished, hedge_won, discarded;
    gw_fail_t end;
    int end_status;
} owner_t;

#define OWNERS 6
static owner_t owners[OWNERS];
static int settles;
static char won_body[16]; /* the body of a hedge that handed its answer over */
static const char *label;  /* NULL: a proxied request's codes */
static const char *head = "GET /x HTTP/1.1\r\nHost: t\r\n\r\n";

static int
on_head(gw_resp_t *r)
{
    owner_t *o = r->arg;
    o->ex.status = o->status = r->status;
    return GW_OK;
}

static int
on_body(gw_resp_t *r, const char *at, size_t len)
{
    owner_t *o = r->arg;
    if (o->blen + len < sizeof(o->body)) {
        memcpy(o->body + o->blen, at, len);
        o->blen += len;
    }
    return GW_OK;
}

static const gw_resp_ops_t resp_ops = { .head = on_head, .body = on_body };

static void
begin(gw_xchg_t *x, struct evbuffer *out)
{
    owner_t *o = x->arg;
    GW_UNUSED(out);
    o->blen = 0;
    o->status = 0;
}

/* The contract: every try's end goes to gw_xchg_end_try(); what it returns ends. */
static void
try_ended(gw_xchg_t *x, gw_fail_t code, bool reusable)
{
    gw_xchg_t *e = gw_xchg_end_try(x, code, reusable);
    if (e == NULL)
        return;
    owner_t *o = e->arg;
    o->finished = true;
    o->end = code;
    o->end_status = e->status;
    o->hedge_won = e->hedge_won;
    gw_xchg_ended(e, code);
    gw_xchg_close(e, reusable);
}

static void
done(gw_xchg_t *x, bool reusable)
{
    owner_t *o = x->arg;
    o->dones++;
    try_ended(x, x->status / 100 == 2 ? GW_FAIL_NONE : GW_FAIL_BAD_STATUS, reusable);
}

static void
fail(gw_xchg_t *x, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int e)
{
    owner_t *o = x->arg;
    GW_UNUSED(doing);
    GW_UNUSED(e);
    o->fails++;
    o->cause = cause;
    o->code = code;
    try_ended(x, code, false);
}

static void
queued(gw_xchg_t *x, bool on)
{
    owner_t *o = x->arg;
    if (on)
        o->queued_on++;
    else
        o->queued_off++;
}

static void
settle(void *sarg)
{
    GW_UNUSED(sarg);
    settles++;
}

static const gw_xchg_ops_t ops;

static owner_t *
owner_new(void)
{
    for (int k = 0; k < OWNERS; k++) {
        if (!owners[k].used) {
            owner_t *o = &owners[k];
            gw_xchg_t ex = o->ex; /* closed: its timers are kept */
            memset(o, 0, sizeof(*o));
            o->ex = ex;
            o->used = true;
            return o;
        }
    }
    return NULL;
}

static gw_xchg_t *
hedge(gw_xchg_t *x)
{
    owner_t *h = owner_new();
    if (h == NULL)
        return NULL;
    gw_xchg_init(&h->ex, &ops, h, NULL, x->w, x->b, x->label, x->rid, x->peer);
    h->ex.head = x->head;
    h->ex.head_len = x->head_len;
    return &h->ex;
}

static void
discard(gw_xchg_t *x, bool reusable)
{
    owner_t *o = x->arg;
    o->discarded = true;
    if (o->status == 200)
        memcpy(won_body, o->body, sizeof(won_body));
    gw_xchg_close(x, reusable);
}

static const gw_xchg_ops_t ops = {
    .resp = &resp_ops,
    .begin = begin,
    .done = done,
    .fail = fail,
    .queued = queued,
    .settle = settle,
    .hedge = hedge,
    .discard = discard,
};

/* --- set-up -------------------------------------------------------------- */

static gw_config_t *cfg;

/* A worker with one backend b whose keys are keys (its servers included). */
static const gw_backend_t *
setup_backend(const char *keys)
{
    char text[1024];
    snprintf(text, sizeof(text), "{\"listen\": [\"1\"], \"workers\": 1, \"backends\": {\"b\": {%s}}}", keys);
    loop_init();
    cfg = gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
    if (cfg == NULL) {
        printf("    %s\n", err);
        return NULL;
    }
    gw_metrics_bind(cfg);
    worker.base = base;
    worker.m = gw_metrics_worker(0);
    gw_upstream_pools_attach(&worker, cfg, NULL);
    memset(script, 0, sizeof(script));
    nscript = next_beh = accepted = requests = settles = 0;
    won_body[0] = '\0';
    label = NULL;
    return cfg->backends[0];
}

/* A worker with one backend b at port; extra: more keys of b. */
static const gw_backend_t *
setup(int port, const char *extra)
{
    char keys[768];
    snprintf(keys, sizeof(keys), "\"url\": \"http://127.0.0.1:%d\", \"timeout_ms\": 2000%s%s", port,
             extra ? ", " : "", extra ? extra : "");
    return setup_backend(keys);
}

static void
teardown(void)
{
    for (int k = 0; k < OWNERS; k++) {
        if (owners[k].used && owners[k].ex.ops)
            gw_xchg_close(&owners[k].ex, false);
        gw_xchg_destroy(&owners[k].ex);
        memset(&owners[k], 0, sizeof(owners[k]));
    }
    for (int k = 0; k < SCONNS; k++)
        sconn_free(k);
    if (cfg) {
        gw_upstream_pools_detach(&worker, cfg);
        event_base_loop(base, EVLOOP_NONBLOCK);
        gw_config_unref(cfg);
        cfg = NULL;
    }
}

/* Starts an exchange of b: the owner, or NULL with the code in *code. */
static owner_t *
start(const gw_backend_t *b, int method, gw_fail_t *code)
{
    owner_t *o = owner_new();
    gw_xchg_init(&o->ex, &ops, o, NULL, &worker, b, label, "rid", "127.0.0.1");
    o->ex.head = head;
    o->ex.head_len = strlen(head);
    o->ex.method = method;
    o->ex.max_body = 1024;
    o->ex.timeout_ms = b->timeout_ms;
    o->ex.per_try = true;
    *code = gw_xchg_start(&o->ex);
    return o;
}

/* Runs the loop until o's call ended, at most ms. */
static void
run(owner_t *o, int ms)
{
    uint64_t end = gw_now_ms() + (uint64_t)ms;
    while (!o->finished && gw_now_ms() < end)
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
}

/* Runs the loop for ms. */
static void
spin(int ms)
{
    uint64_t end = gw_now_ms() + (uint64_t)ms;
    while (gw_now_ms() < end)
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
}

/* --- tests --------------------------------------------------------------- */

static void
answer_and_reuse(void)
{
    const gw_backend_t *b = setup(backend_start(), NULL);
    if (b == NULL)
        return;
    for (int i = 0; i < 2; i++) {
        gw_fail_t code;
        owner_t *o = start(b, HTTP_GET, &code);
        CHECK(code == GW_FAIL_NONE);
        run(o, 2000);
        CHECK(o->finished && o->end == GW_FAIL_NONE && o->end_status == 200);
        CHECK(o->dones == 1 && o->fails == 0);
        CHECK(o->blen == 2 && memcmp(o->body, "ok", 2) == 0);
        o->used = false;
    }
    CHECK(accepted == 1); /* the second call took the pooled connection */
    CHECK(requests == 2);
    CHECK(settles >= 2);
    teardown();
    evconnlistener_free(listener);
}

/* A pooled connection the backend closes as the request arrives: sent once
 * more on a new one for GET; a POST fails, named as each route kind does. */
static void
stale_connection_resend(void)
{
    const gw_backend_t *b = setup(backend_start(), NULL);
    if (b == NULL)
        return;
    gw_fail_t code;
    owner_t *o = start(b, HTTP_GET, &code);
    run(o, 2000);
    o->used = false;
    script[0] = B_DROP;
    script[1] = B_OK;
    nscript = 2;
    next_beh = 0;
    o = start(b, HTTP_GET, &code);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_NONE && o->end_status == 200);
    CHECK(o->fails == 0 && o->dones == 1);
    CHECK(accepted == 2);
    o->used = false;
    /* not idempotent: no resend */
    const char *kinds[2] = { NULL, "c" };
    gw_fail_t want[2] = { GW_FAIL_RESET, GW_FAIL_TRUNCATED };
    for (int k = 0; k < 2; k++) {
        label = kinds[k];
        script[0] = B_DROP;
        nscript = 1;
        next_beh = 0;
        o = start(b, HTTP_POST, &code);
        run(o, 2000);
        CHECK(o->finished && o->fails == 1 && o->cause == GW_XCHG_BROKE);
        CHECK(o->end == want[k]);
        o->used = false;
        /* the next call opens a connection again (none is pooled) */
        o = start(b, HTTP_GET, &code);
        run(o, 2000);
        o->used = false;
    }
    teardown();
    evconnlistener_free(listener);
}

static void
connect_failure_retried(void)
{
    const gw_backend_t *b = setup(closed_port(), "\"retry\": {\"attempts\": 3, \"backoff_base_ms\": 1, "
                                                 "\"backoff_cap_ms\": 2}");
    if (b == NULL)
        return;
    uint64_t before = worker.m->backends[b->mid].retries;
    gw_fail_t code;
    owner_t *o = start(b, HTTP_GET, &code);
    CHECK(code == GW_FAIL_NONE);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_CONNECT_FAILED);
    CHECK(o->fails == 3 && o->cause == GW_XCHG_CONNECT);
    CHECK(worker.m->backends[b->mid].retries - before == 2);
    teardown();
}

/* A listed status is retried; its keep-alive connection serves the retry. */
static void
status_retried(void)
{
    const gw_backend_t *b = setup(backend_start(), "\"retry\": {\"attempts\": 2, \"backoff_base_ms\": 1, "
                                                   "\"backoff_cap_ms\": 2}");
    if (b == NULL)
        return;
    script[0] = B_503;
    nscript = 1;
    gw_fail_t code;
    owner_t *o = start(b, HTTP_GET, &code);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_NONE && o->end_status == 200);
    CHECK(o->dones == 2 && requests == 2 && accepted == 1);
    o->used = false;
    /* no tries left: the last status is the answer */
    script[0] = script[1] = B_503;
    nscript = 2;
    next_beh = 0;
    o = start(b, HTTP_GET, &code);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_BAD_STATUS && o->end_status == 503);
    teardown();
    evconnlistener_free(listener);
}

static void
timeouts(void)
{
    const gw_backend_t *b = setup(backend_start(), "\"retry\": {\"attempts\": 3, \"backoff_base_ms\": 1, "
                                                   "\"backoff_cap_ms\": 2, \"per_try_timeout_ms\": 50}");
    if (b == NULL)
        return;
    /* a try that hangs is given up after per_try_timeout_ms and retried */
    script[0] = B_HOLD;
    nscript = 1;
    gw_fail_t code;
    owner_t *o = start(b, HTTP_GET, &code);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_NONE && o->fails == 1 && o->cause == GW_XCHG_TRY_TIMEOUT);
    o->used = false;
    teardown();
    evconnlistener_free(listener);
    /* the call's timeout is final: no retry after it */
    b = setup(backend_start(), "\"retry\": {\"attempts\": 3}");
    if (b == NULL)
        return;
    script[0] = B_HOLD;
    nscript = 1;
    o = owner_new();
    gw_xchg_init(&o->ex, &ops, o, NULL, &worker, b, NULL, "rid", "127.0.0.1");
    o->ex.head = head;
    o->ex.head_len = strlen(head);
    o->ex.method = HTTP_GET;
    o->ex.max_body = 1024;
    o->ex.timeout_ms = 60;
    CHECK(gw_xchg_start(&o->ex) == GW_FAIL_NONE);
    run(o, 2000);
    CHECK(o->finished && o->end == GW_FAIL_TIMEOUT && o->fails == 1 && o->cause == GW_XCHG_TIMEOUT);
    CHECK(requests == 1);
    teardown();
    evconnlistener_free(listener);
}

/* The first try is slow: the hedge answers first and hands its answer to
 * the owner; the slow try is closed. */
static void
hedge_wins(void)
{
    const gw_backend_t *b = setup(backend_start(), "\"retry\": {\"attempts\": 1}");
    if (b == NULL)
        return;
    script[0] = B_SLOW;
    script[1] = B_OK;
    nscript = 2;
    owner_t *o = owner_new();
    gw_xchg_init(&o->ex, &ops, o, NULL, &worker, b, "c", "rid", "127.0.0.1");
    o->ex.head = head;
    o->ex.head_len = strlen(head);
    o->ex.method = HTTP_GET;
    o->ex.max_body = 1024;
    o->ex.timeout_ms = 2000;
    o->ex.hedge_ms = 30;
    uint64_t before = worker.m->backends[b->mid].hedges;
    CHECK(gw_xchg_start(&o->ex) == GW_FAIL_NONE);
    run(o, 3000);
    CHECK(o->finished && o->end == GW_FAIL_NONE && o->hedge_won);
    CHECK(owners[1].discarded && strcmp(won_body, "ok") == 0);
    CHECK(accepted == 2 && worker.m->backends[b->mid].hedges - before == 1);
    teardown();
    evconnlistener_free(listener);
}

/* max_connections 1: the second call waits in the queue and takes the
 * connection the first one gives back (the loop runs only once all three
 * were started, so the first cannot be done before). */
static void
queue(void)
{
    const gw_backend_t *b = setup(backend_start(), "\"max_connections\": 1, \"max_pending\": 1");
    if (b == NULL)
        return;
    gw_fail_t c1, c2, c3;
    owner_t *o1 = start(b, HTTP_GET, &c1);
    owner_t *o2 = start(b, HTTP_GET, &c2);
    owner_t *o3 = start(b, HTTP_GET, &c3);
    CHECK(c1 == GW_FAIL_NONE && c2 == GW_FAIL_NONE && c3 == GW_FAIL_QUEUE_FULL);
    CHECK(o2->queued_on == 1 && o2->queued_off == 0);
    gw_xchg_close(&o3->ex, false);
    o3->used = false;
    run(o2, 2000);
    CHECK(o1->finished && o2->finished && o2->end == GW_FAIL_NONE && o2->queued_off == 1);
    CHECK(accepted == 1);
    spin(10);
    teardown();
    evconnlistener_free(listener);
}

/* Two servers, each on a listener of the scripted backend: every request
 * to server 0 is held, server 1 answers at once; max_connections 1 and
 * max_pending 1 each; the loop runs only once all calls were started.
 * o[0] and o[1] take a server each; o[2] and o[3] wait, each counted in
 * one server's max_pending, both in the queues of the two; a fifth call
 * is refused (queue_full). *second: server 1's listener (the caller frees
 * it); *fast: the owner whose call went to server 1. */
static const gw_backend_t *
two_servers(owner_t **o, owner_t **fast, struct evconnlistener **second, const char *extra)
{
    int p1 = backend_start();
    struct evconnlistener *first = listener;
    int p2 = backend_start();
    *second = listener;
    listener = first;
    char keys[768];
    snprintf(keys, sizeof(keys),
             "\"servers\": [\"http://127.0.0.1:%d\", \"http://127.0.0.1:%d\"], \"timeout_ms\": 2000,"
             " \"max_connections\": 1, \"max_pending\": 1%s%s",
             p1, p2, extra ? ", " : "", extra ? extra : "");
    const gw_backend_t *b = setup_backend(keys);
    if (b == NULL)
        return NULL;
    hold_listener = first;
    gw_fail_t c[5];
    for (int k = 0; k < 5; k++)
        o[k] = start(b, HTTP_GET, &c[k]);
    CHECK(c[0] == GW_FAIL_NONE && c[1] == GW_FAIL_NONE && o[0]->ex.target != o[1]->ex.target);
    CHECK(c[2] == GW_FAIL_NONE && c[3] == GW_FAIL_NONE && c[4] == GW_FAIL_QUEUE_FULL);
    CHECK(o[2]->queued_on == 1 && o[3]->queued_on == 1);
    for (unsigned si = 0; si < 2; si++) {
        gw_pool_t *pool = gw_upstream_pool(&worker, b, si);
        CHECK(pool->nqueued == 1 && pool->nlinks == 2);
    }
    CHECK(worker.m->backends[b->mid].queued == 2);
    gw_xchg_close(&o[4]->ex, false);
    o[4]->used = false;
    *fast = o[0]->ex.target == 1 ? o[0] : o[1];
    return b;
}

/* Ends a two_servers() test. */
static void
two_servers_end(const gw_backend_t *b, struct evconnlistener *second)
{
    for (unsigned si = 0; si < 2; si++) {
        gw_pool_t *pool = gw_upstream_pool(&worker, b, si);
        CHECK(pool->nqueued == 0 && pool->nlinks == 0 && pool->qhead == NULL);
    }
    CHECK(worker.m->backends[b->mid].queued == 0);
    spin(10);
    hold_listener = NULL;
    teardown();
    evconnlistener_free(listener);
    evconnlistener_free(second);
}

/* The server that frees its connection serves both waiters, whatever
 * server each picked first, on the connection it pooled (nothing new is
 * opened); they leave the other server's queue at once. */
static void
queue_over_servers(void)
{
    owner_t *o[5], *fast;
    struct evconnlistener *second;
    const gw_backend_t *b = two_servers(o, &fast, &second, NULL);
    if (b == NULL)
        return;
    run(o[3], 2000);
    owner_t *held = fast == o[0] ? o[1] : o[0];
    CHECK(fast->finished && fast->end == GW_FAIL_NONE && !held->finished);
    CHECK(o[2]->finished && o[2]->end == GW_FAIL_NONE && o[2]->queued_off == 1);
    CHECK(o[3]->finished && o[3]->end == GW_FAIL_NONE && o[3]->queued_off == 1);
    CHECK(accepted == 2 && requests == 4);
    two_servers_end(b, second);
}

/* A waiter that leaves (its client went away) leaves every queue; the
 * other takes the first free connection. */
static void
queue_over_servers_cancel(void)
{
    owner_t *o[5], *fast;
    struct evconnlistener *second;
    const gw_backend_t *b = two_servers(o, &fast, &second, NULL);
    if (b == NULL)
        return;
    gw_xchg_close(&o[2]->ex, false);
    o[2]->used = false;
    for (unsigned si = 0; si < 2; si++)
        CHECK(gw_upstream_pool(&worker, b, si)->nlinks == 1);
    CHECK(worker.m->backends[b->mid].queued == 1);
    run(o[3], 2000);
    CHECK(fast->finished && o[3]->finished && o[3]->end == GW_FAIL_NONE && requests == 3);
    two_servers_end(b, second);
}

/* Server 1 is ejected while calls wait for it: the connection it frees is
 * not taken (the waiters wait on, for server 0, which holds its one), and
 * they end with queue_timeout. */
static void
queue_over_servers_ejected(void)
{
    owner_t *o[5], *fast;
    struct evconnlistener *second;
    const gw_backend_t *b =
        two_servers(o, &fast, &second,
                    "\"queue_timeout_ms\": 200, \"outlier_detection\": {\"consecutive_failures\": 1,"
                    " \"eject_ms\": 60000, \"max_ejected_percent\": 100}");
    if (b == NULL)
        return;
    gw_cluster_report(b, &b->servers[1], GW_FAIL_CONNECT_FAILED, 0, gw_now_ms());
    CHECK(!gw_cluster_usable(&b->servers[1], gw_now_ms()));
    run(o[3], 2000);
    CHECK(fast->finished && fast->end == GW_FAIL_NONE);
    CHECK(o[2]->finished && o[2]->end == GW_FAIL_QUEUE_TIMEOUT);
    CHECK(o[3]->finished && o[3]->end == GW_FAIL_QUEUE_TIMEOUT);
    CHECK(accepted == 2 && requests == 2);
    two_servers_end(b, second);
}

TEST_MAIN({ "answer_and_reuse", answer_and_reuse },
          { "stale_connection_resend", stale_connection_resend }, { "connect_failure_retried", connect_failure_retried },
          { "status_retried", status_retried }, { "timeouts", timeouts }, { "hedge_wins", hedge_wins },
          { "queue", queue }, { "queue_over_servers", queue_over_servers },
          { "queue_over_servers_cancel", queue_over_servers_cancel },
          { "queue_over_servers_ejected", queue_over_servers_ejected })
