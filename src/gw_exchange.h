/*
 * gw_exchange.h - one upstream exchange: a request sent to a backend and
 * its answer read, for aggregate calls and proxy routes alike.
 *
 * An exchange owns what both route kinds do the same way: taking a pooled
 * or new connection (or a place in the backend's wait queue), choosing
 * where each try goes, sending the request head and the replayable body,
 * reading the answer through gw_resp (pausing when the owner cannot take
 * more), sending once more on a new connection when a pooled one turns out
 * stale, the call's timeout, per-try timeouts, retries (backoff, retry
 * budget, which failures), hedges (a copy of the request on a new
 * connection when no answer came in time; the first good answer wins), the
 * breaker's admission and outcomes, the backend's call metrics, the
 * failure codes as the route kind names them (gw_fail.h) and the log lines
 * of connection failures and invalid answers. The owner (gw_agg.c's call
 * exchange, gw_proxy.c's request) keeps what is its own: rendering the
 * request, what the answer becomes (a parsed body, a stream to the
 * client), the answer to its client, and its other log lines.
 *
 * Life: gw_xchg_init() once per request, gw_xchg_start() (nothing is called
 * back from inside it), then the loop calls back the owner's ops until the
 * owner ends the exchange with gw_xchg_close(). A try ends in exactly one of
 * ops->done (the whole answer was read) or ops->fail (it failed in a way
 * the exchange does not repair itself); the owner judges the answer and
 * hands the outcome to gw_xchg_end_try(), which decides retries and
 * hedges, or ends the exchange.
 *
 * Servers: each try goes to one server of the backend, chosen by
 * gw_cluster_pick() (its balance, health and ejection, and x->tried, so a
 * retry or a hedge goes to a server not tried yet when there is one; a
 * hash balance uses x->hash). A server whose pool is full is passed over
 * for another usable one with room; only when every usable server is full
 * does the try wait, in the queues of all of them at once (the untried
 * ones when there are), and it takes the first server that frees a
 * connection while usable (gw_upstream_wait()); it counts towards the
 * max_pending of the server it picked first, or of another of them whose
 * queue has room. Those are its configuration's servers: across a reload
 * a waiting call never gets a server of another configuration. No usable
 * server fails the try with NO_HEALTHY_SERVER at once. The resend on a
 * stale pooled connection stays on its server (a new connection). A try
 * counts in its server's in-flight requests (least_request) from the
 * moment it has a connection until that connection goes back, and its
 * outcome is reported once (gw_cluster_report, outlier detection) unless
 * it was cancelled. Without a "retry" section, a backend of several
 * servers still retries, at once, on another server, a try that could not
 * connect (refused, connect timeout, TLS, name), or whose connection was
 * reset before any answer byte, when the request is idempotent and
 * replayable, within the call's timeout, the deadline and the retry
 * budget, once per other server (nginx's proxy_next_upstream error
 * timeout).
 *
 * Hedges: an exchange with hedge_ms set gets a twin after that long
 * without an answer byte: ops->hedge makes a new exchange (a copy of the
 * request in a new owner context), sent on a new connection. Both run;
 * gw_xchg_end_try() of either decides: the first good answer ends the
 * call (a winning hedge hands its answer to the owner exchange), a failed
 * leg leaves the other running, the last failure goes through the retry
 * rules. The exchange that is not needed any more is given back with
 * ops->discard (its owner context frees it with gw_xchg_close()).
 *
 * Ownership: the gw_xchg_t is embedded in the owner's context and owned by
 * it; the exchange owns its connection (released by gw_xchg_detach() or
 * gw_xchg_close()), its wait-queue entry (with the places in other
 * servers' queues it allocates when it waits for several, freed by
 * gw_xchg_close()), its retry-budget slot and count,
 * and its timers (kept across requests, freed by gw_xchg_destroy()). The
 * request head is borrowed: it must stay unchanged until the exchange is
 * closed (a retry sends it again). Every entry point from the loop (an
 * upstream event, a queue callback, a timer) calls at most one of the
 * owner's ops and then ops->settle(sarg) as its very last action:
 * ops->done, ops->fail and ops->drained may close the exchange, and even
 * free the owner's context, provided sarg stays valid until settle (the
 * exchange reads sarg before calling them). settle may free everything.
 * The hedge timer is the exception: it calls ops->hedge and, when that
 * hedge cannot be sent, ops->discard on the new exchange, and no settle
 * (nothing of the call ended). ops->discard is only ever called from
 * inside gw_xchg_end_try() or the hedge timer, for the other exchange.
 */
#ifndef GW_EXCHANGE_H
#define GW_EXCHANGE_H

#include "gw_core.h"
#include "gw_fail.h"
#include "gw_resp.h"
#include "gw_upstream.h"

struct evbuffer;
struct event;

typedef struct gw_xchg_s gw_xchg_t;

/* Where a failure came from, so the owner's log line can say so. The
 * codes are the route kind's (gw_xchg_init(): an aggregate call gets
 * CONNECT_FAILED for RESOLVE_FAILED and TLS_FAILED, TRUNCATED for RESET; a
 * proxied request BAD_RESPONSE for a cut head). */
typedef enum {
    GW_XCHG_START,       /* no try could be sent: max_connections (UNAVAILABLE), no socket (CONNECT_FAILED),
                          * the circuit opened before a retry (CIRCUIT_OPEN), no usable server
                          * (NO_HEALTHY_SERVER) */
    GW_XCHG_QUEUE,       /* QUEUE_FULL or QUEUE_TIMEOUT */
    GW_XCHG_CONNECT,     /* RESOLVE_FAILED, TLS_FAILED, TIMEOUT (connect_timeout_ms), CONNECT_FAILED;
                          * logged already */
    GW_XCHG_BROKE,       /* closed or reset: RESET before any response byte, TRUNCATED after some;
                          * logged already */
    GW_XCHG_INVALID,     /* gw_resp refused the answer (BAD_RESPONSE): rd.error and rd.why say why
                          * (GW_RESP_STOPPED: an owner's callback stopped it); the connection is
                          * marked broken; logged already when rd.error is GW_RESP_BAD */
    GW_XCHG_TIMEOUT,     /* the call's timeout (TIMEOUT): final, never retried */
    GW_XCHG_TRY_TIMEOUT  /* per_try_timeout_ms (TIMEOUT), logged already */
} gw_xchg_cause_t;

typedef struct {
    /* The owner's gw_resp callbacks; they get the owner's arg as r->arg. */
    const gw_resp_ops_t *resp;
    /* A try has its connection and the request head is queued in out:
     * forget what an earlier try left of an answer, and append the body
     * (what can be sent now of it; it may send). May be NULL. */
    void (*begin)(gw_xchg_t *x, struct evbuffer *out);
    /* The whole answer was read (x->rd); reusable: the connection may
     * serve another request as far as the answer goes. */
    void (*done)(gw_xchg_t *x, bool reusable);
    /* The try failed: cause, code (see gw_xchg_cause_t), what it was doing
     * ("connecting to upstream"), errno or 0. The stale-connection resend
     * was tried already. */
    void (*fail)(gw_xchg_t *x, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int err);
    /* The connection connected, or its output fell to low_water after a
     * send that could not write everything. May be NULL. */
    void (*drained)(gw_xchg_t *x);
    /* After a batch of answer bytes that did not end the answer: false to
     * stop reading until the owner resumes it (gw_upstream_read(x->u)).
     * May be NULL. */
    bool (*flush)(gw_xchg_t *x);
    /* The try entered (on) or left with a connection (off) the backend's
     * wait queue. May be NULL. */
    void (*queued)(gw_xchg_t *x, bool on);
    /* Whether the request can still be sent again whole (the body sent so
     * far is at hand, nothing of an answer passed on). NULL: always. */
    bool (*replayable)(gw_xchg_t *x);
    /* The last call of every entry point from the loop. */
    void (*settle)(void *sarg);
    /* Hedging only (else NULL): a new exchange, prepared with
     * gw_xchg_init() and head set, in a new owner context that copies x's
     * request; NULL when none can be made. */
    gw_xchg_t *(*hedge)(gw_xchg_t *x);
    /* Hedging only: x, a leg that is not needed any more (a hedge that
     * lost, failed, or handed its answer over), is closed by its owner
     * context (gw_xchg_close(x, reusable)) with that context. */
    void (*discard)(gw_xchg_t *x, bool reusable);
} gw_xchg_ops_t;

struct gw_xchg_s {
    const gw_xchg_ops_t *ops;
    void *arg;              /* the owner's; also gw_resp's r->arg */
    void *sarg;             /* ops->settle's */
    gw_worker_t *w;
    const gw_backend_t *b;
    const char *rid;        /* the client request's id, for log lines (borrowed) */
    const char *peer;       /* the client's address, for log lines (borrowed) */
    const char *label;      /* an aggregate call's name; NULL: a proxied request (borrowed) */
    gw_upstream_t *u;       /* the try's connection, NULL while queued or between tries; the owner may
                             * write to its output and stop or resume its reading (a streamed body, a
                             * slow client), never release it */
    gw_upstream_wait_t wait; /* queued for a connection of full pools (of one or several servers) */
    gw_resp_t rd;           /* the answer being read */
    const char *head;       /* the request head (borrowed) */
    size_t head_len;
    size_t host_off;        /* where the server's Host value goes in head ("Host: " ends there); 0: the head
                             * is whole (its Host written by the owner) */
    uint64_t hash;          /* with has_hash: the hash of the backend's hash_key for this request */
    bool has_hash;
    int method;             /* llhttp's: idempotency, HEAD answers */
    uint64_t max_body;
    size_t low_water;       /* ops->drained when the output falls to this */
    int timeout_ms;         /* the call's: its timer, and no backoff sleeps past it */
    uint64_t deadline_us;   /* the route's deadline (0: none): no timer nor backoff past it */
    struct event *timer;    /* the call's timeout; made on first use, kept */
    struct event *rtimer;   /* the backoff sleep, else the per-try timeout; made on first use, kept */
    uint64_t start_us;      /* started (metrics count the call at close); 0: never */
    uint64_t end_us;        /* start + timeout_ms */
    int status;             /* the answer's status for breaker, retries and logs (the owner sets it) */
    unsigned attempt;       /* tries started, the first included; 0: never sent */
    int retry_ms;           /* the sleep decided before the next try */
    gw_fail_t retry_code;   /* why the next try follows */
    gw_fail_t fail_code;    /* this try's failure as the exchange saw it, before the route kind named it */
    unsigned target;        /* the server of the try in flight (index in b->servers) */
    uint32_t tried;         /* servers tried (bit per index), for the next try's choice */
    gw_xchg_cause_t fail_cause; /* with fail_code: where this try's failure came from */
    gw_fail_t end_code;     /* with ended: how the call ended, for the metrics */
    bool per_try;           /* per_try_timeout_ms applies (aggregate calls: proxies stream) */
    bool ended;
    bool got_bytes;         /* an answer byte arrived in this try */
    bool resent;            /* the stale-connection resend was used */
    bool done;              /* the whole answer was read */
    bool sent;              /* this try got a connection (else its end says nothing about the backend) */
    bool inflight;          /* counted in its server's in-flight tries (gw_cluster_inflight) */
    bool srv_open;          /* sent, its outcome not reported to its server yet (gw_cluster_report) */
    bool admitted;          /* the breaker let this try through: its outcome is reported once */
    bool counted;           /* in the backend's requests in flight (retry budget) */
    bool slot;              /* this try (or the sleep before it) holds a retry budget slot */
    bool backoff;           /* rtimer is the backoff sleep */
    bool final;             /* the call's timeout ended it: no retry */
    /* hedging */
    int hedge_ms;           /* hedge_after_ms, 0: none */
    struct event *htimer;   /* made on first use, kept */
    gw_xchg_t *twin;        /* its hedge, while one runs */
    gw_xchg_t *owner;       /* a hedge: the exchange it copies */
    bool waiting_twin;      /* its own try failed while its hedge runs: the hedge decides */
    bool hedge_won;         /* the call's answer is its hedge's */
};

/*
 * Prepares x (zeroed, or closed) for a request to backend b on worker w:
 * ops and their args; label, an aggregate call's name, or NULL for a
 * proxied request: it names the call in log lines, and picks how failure
 * codes are reported (gw_fail.h: the call or the proxy names; ops->fail
 * gets them so); rid and peer, the client request's id and address, for
 * log lines. The three are borrowed, valid until close. The
 * owner then sets head/head_len (and host_off), method, max_body, timeout_ms,
 * deadline_us, per_try, hedge_ms, low_water and hash/has_hash as it needs,
 * and calls gw_xchg_start().
 */
void gw_xchg_init(gw_xchg_t *x, const gw_xchg_ops_t *ops, void *arg, void *sarg, gw_worker_t *w,
                  const gw_backend_t *b, const char *label, const char *rid, const char *peer);

/*
 * Starts the call: counted for the metrics from now on, asks the breaker,
 * sends the first try (or queues it when max_connections are in use and
 * the backend has a queue), arms the call's timeout unless the deadline
 * comes first, the per-try timeout and the hedge. GW_FAIL_NONE, or the code that
 * kept it from starting (CIRCUIT_OPEN, QUEUE_FULL, UNAVAILABLE,
 * NO_HEALTHY_SERVER, CONNECT_FAILED with errno set); then nothing was called back, and the
 * owner ends it (gw_xchg_ended(), gw_xchg_close()).
 */
gw_fail_t gw_xchg_start(gw_xchg_t *x);

/*
 * A try of x ended: with an answer the owner accepts (GW_FAIL_NONE), or
 * failed with code (x->status: the answer's, when there was one);
 * reusable: its connection may be pooled. The breaker hears the try's
 * outcome, its retry budget slot goes back. NULL when that ending was taken
 * care of here: a retry sleeps, or the other leg of a hedged call goes on
 * (x may have been discarded then). Else the exchange whose call ends with
 * this outcome: x, or, when x is a hedge, its owner (x was discarded after
 * the caller took what it needs of it; owner->hedge_won says the answer is
 * the hedge's, owner->status is the hedge's).
 */
gw_xchg_t *gw_xchg_end_try(gw_xchg_t *x, gw_fail_t code, bool reusable);

/*
 * Retries: the try in flight failed with code (BAD_STATUS: x->status is
 * the answer's) and is sent again when the backend's "retry" allows it:
 * tries left, the code or status retried, the method, ops->replayable, a
 * backoff that ends before the call's timeout and the deadline, the retry
 * budget. gw_xchg_end_try() asks this; an owner that decides inside a
 * gw_resp callback (a proxy's retried status, before its head is passed
 * on), where the connection must not go yet, asks in two steps: decide
 * (true: the slot is taken, the breaker and the metrics heard this try;
 * false, logged when the budget or time said no: nothing happened), then,
 * once out of the callback, go (the connection released, pooled when
 * reusable; the sleep started). err: errno for the log line, or 0.
 */
bool gw_xchg_retry_decide(gw_xchg_t *x, gw_fail_t code, int err, bool replayable);
void gw_xchg_retry_go(gw_xchg_t *x, bool reusable);

/* The breaker and the try's server (outlier detection) hear how the try
 * went (once per try; status: the answer's, 0 when none); an unsent try is
 * abandoned, not counted; a local code (gw_fail_local) is not the server's. */
void gw_xchg_outcome(gw_xchg_t *x, gw_fail_t code, int status);

/* How the call ended, for the metrics counted at close (GW_FAIL_NONE:
 * success); without it, a close counts "cancelled". */
static inline void
gw_xchg_ended(gw_xchg_t *x, gw_fail_t code)
{
    x->ended = true;
    x->end_code = code;
}

/* The answer is in: the connection goes (pooled when reusable), the
 * per-try and hedge timers stop and the wait queue is left; the call's
 * timer runs on until close (an answer parsed on the thread pool). */
void gw_xchg_detach(gw_xchg_t *x, bool reusable);

/* Ends the exchange: the call counted for the metrics, budget slot and
 * count given back, queues left (their extra places freed), an open admission abandoned, the
 * connection pooled when reusable else closed, timers stopped, unlinked
 * from its twin or owner; x is ready for gw_xchg_init() again (its
 * timers kept: an owner that clears its context for reuse keeps x as it
 * is). */
void gw_xchg_close(gw_xchg_t *x, bool reusable);

/* The server of x's try (in flight, or the last one): its label for log lines. */
const char *gw_xchg_server(const gw_xchg_t *x);

/* Frees x's timers (x closed, or never started). */
void gw_xchg_destroy(gw_xchg_t *x);

#endif
