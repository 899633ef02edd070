/*
 * gw_stub.c - the test backend ("stub") for gatherd.
 *
 * A small HTTP/1.1 server written directly on libevent bufferevents (no
 * evhttp) that the integration tests, the demo and the benchmarks put behind
 * the gateway. Every response can be shaped per request with query
 * parameters or X-Stub-* headers: status, delays, body size, chunking,
 * truncation, early close or reset, an echo of the request, extra headers.
 * Requests can be logged per tag (tag=T; GET /log?tag=T lists them with
 * their arrival time; /log?reset=1) and a tag's first requests can fail
 * (fail_first=N with fail_status=S or fail_mode=reset|close) or wait
 * (delay_first=MS): the retry and hedging tests count tries with them.
 * A few built-in paths (/users/{id}, /orders, /products/{id},
 * /recommendations, /stats, /static) serve the demo and the benchmarks.
 * tests/stub/README.md documents the command line and every control.
 *
 * Design notes:
 *  - One event_base per worker thread (-t N), each with its own listener
 *    (SO_REUSEPORT when N > 1); the only shared state is a few atomic
 *    counters, so libevent needs no locking.
 *  - A connection works on one request at a time: while a response is being
 *    produced (delay, streamed or paced body) later pipelined requests wait
 *    in the input buffer, so responses always leave in request order.
 *  - Memory is bounded: request head <= 64 KiB (431 beyond), request body
 *    <= 16 MiB (413 beyond; sink=1 counts and drops up to 2^40 bytes), unread input <= ~256 KiB (reading pauses),
 *    queued output <= ~256 KiB plus one piece (big bodies are produced as
 *    the socket drains, padding bytes by reference to a static block).
 *  - The common path allocates almost nothing per request: the head is
 *    copied into a per-connection buffer and parsed in place.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>

/* ---------------------------------------------------------------- limits */

#define HEAD_MAX (64u * 1024u)         /* request line + headers */
#define BODY_MAX (16u * 1024u * 1024u) /* request body */
#define MAX_HEADERS 128                /* request header fields */
#define MAX_EXTRA 32                   /* header= controls per request */
#define MAX_LISTEN 16                  /* -l options */
#define MAX_THREADS 256                /* -t */
#define READ_HIGH (256u * 1024u)       /* reading pauses above this much unread input */
#define OUT_HIGH (256u * 1024u)        /* stop producing body above this much queued output */
#define OUT_LOW (64u * 1024u)          /* ... and resume below this */
#define PAD_SIZE (256u * 1024u)        /* static block of 'x' used for size= padding */
#define REF_MIN (16u * 1024u)          /* pad pieces this big are added by reference */
#define CHUNK_LINE_MAX 4096            /* chunk-size line or trailer line of a request */
#define LINGER_MS 2000                 /* how long a closing connection drains input */
#define CTL_SIZE_MAX (1ull << 40)      /* size= and truncate= */
#define CTL_MS_MAX 3600000LL           /* delay= and chunk_delay= */
#define DEFAULT_ADDR "127.0.0.1:9101"
#define TRAILING_MAX 4096              /* trailing_bytes= */
#define TAG_MAX 64                     /* tag= length */
#define TAGS_MAX 256                   /* distinct tags logged (more are not logged) */
#define TAG_LOG_MAX 4096               /* entries kept per tag (more are counted only) */

/* ---------------------------------------------------------------- types */

struct hdr {
    char *name;
    size_t nlen;
    const char *val;
    size_t vlen;
};

/* An extra response header from a header= control. */
struct kv {
    const char *name;
    size_t nlen;
    const char *val;
    size_t vlen;
};

/* Where close= / reset= cut the response. */
enum at_point { AT_NONE = 0, AT_BEFORE_HEADERS, AT_AFTER_HEADERS, AT_MID_BODY };

/* The per-request controls, already validated. */
struct ctl {
    int status;
    long long delay_ms;
    long long delay_port; /* delay_port=P: delay= only on connections accepted on port P (0: any) */
    long long size; /* -1: not given */
    bool chunked;
    long long chunk;
    long long chunk_delay_ms;
    const char *body;
    size_t body_len;
    bool has_body;
    bool bad_json;
    long long truncate; /* -1: not given */
    bool wrong_length;
    enum at_point close_at;
    enum at_point reset_at;
    bool echo;
    bool keepalive;
    long long close_idle_ms; /* 0: stay open while idle */
    bool garbage;
    bool close_if_reused;
    bool reset_if_reused;
    bool unframed;
    bool abort_on_eof;
    const char *trailing; /* trailing_bytes= */
    size_t trailing_len;
    long long trailing_delay_ms;
    int interim; /* 0 or a 1xx status sent before the real head */
    long long pad_header; /* bytes of an X-Pad response header, 0: none */
    bool sink; /* request body of any size counted and discarded, answer {"received":N} */
    bool stats_reset; /* GET /stats?reset=1: max_in_flight starts again from in_flight */
    bool ct_override; /* a header= control set Content-Type */
    char tag[TAG_MAX + 1]; /* tag=: the request is logged under it ("" none) */
    long long fail_first;  /* with tag=: the tag's first N requests fail */
    int fail_status;       /* ... with this status (default 503) */
    enum fail_mode { FAIL_STATUS = 0, FAIL_RESET, FAIL_CLOSE } fail_mode;
    long long delay_first_ms; /* with tag=: the tag's first request waits this long */
    const char *raw;       /* raw=: bytes sent instead of a response */
    size_t raw_len;
    bool has_raw;
    long long keys;        /* keys=N: a generated object of N keys; -1: not given */
    bool log_reset;        /* GET /log?reset=1 */
    const char *batch;     /* batch=PARAM: answer one object per value of query parameter PARAM */
    size_t batch_len;
    const char *batch_vals; /* PARAM's decoded value (found by batch_controls) */
    size_t batch_vals_len;
    const char *batch_omit, *batch_fail; /* comma-separated values left out / failing the request */
    size_t batch_omit_len, batch_fail_len;
    bool batch_dup;        /* each object again, later, with "name":"dup V" */
    bool batch_reverse;    /* the objects in reverse order */
    char batch_sep;        /* between PARAM's values (default ",") */
    struct kv extra[MAX_EXTRA];
    int nextra;
};

/* Request parser position. */
enum pstate { P_HEAD, P_BODY, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF, P_TRAILER };

/* Connection state: only S_IDLE parses input. */
enum cstate {
    S_IDLE,       /* reading / parsing requests */
    S_DELAY,      /* delay= timer before the response head */
    S_STREAM,     /* body production waits for output to drain */
    S_CHUNK_WAIT, /* chunk_delay= timer between pieces */
    S_CLOSING,    /* output drains, then FIN or RST */
    S_LINGER,     /* FIN sent, input discarded until EOF or timeout */
    S_STUCK       /* wrong_length=1: open forever, input discarded */
};

enum end_action { END_KEEP, END_FIN, END_RST, END_STUCK };

/* Parser results other than an HTTP error status. */
#define R_MORE 0
#define R_READY 1

struct worker;

struct conn {
    struct worker *w;
    struct conn *prev, *next;
    struct bufferevent *bev;
    struct event *timer;     /* delay, chunk pacing, deferred close, linger */
    struct evbuffer *body;   /* request body, kept only for echo=1 */
    struct evbuffer *prefix; /* response body (or its start, for size=) */
    unsigned long long id;
    unsigned long long nreq;
    enum cstate state;
    enum pstate pstate;
    enum end_action close_action;
    bool peer_eof;
    bool idle_close; /* close_idle_ms: the timer closes the idle connection */
    bool idle_send;  /* trailing_delay_ms: the timer sends idle_bytes */
    char idle_bytes[TRAILING_MAX];
    size_t idle_bytes_len;
    bool oom; /* an evbuffer_add failed while building output */
    bool in_flight; /* this request is counted in g_in_flight */
    int tag_idx;    /* tag log entry of the request in flight: tag index, or -1 */
    long tag_entry; /* ... and entry index */
    double received_ms; /* CLOCK_MONOTONIC ms when the request head was complete */
    unsigned lport;     /* the local port it was accepted on: X-Stub-Port of every answer */
    const char *errmsg;
    char errbuf[128];

    /* the request being handled; pointers go into head / scratch */
    char *head;
    size_t head_cap;
    size_t head_len;
    char *scratch; /* percent-decoded values; 2 * head_cap bytes */
    size_t scratch_used;
    const char *method;
    size_t mlen;
    const char *path;
    size_t plen;
    const char *query;
    size_t qlen;
    int minor;
    struct hdr h[MAX_HEADERS];
    int nh;
    long long clen;
    bool has_clen;
    bool req_chunked;
    bool conn_close;
    bool conn_keepalive;
    bool expect_continue;
    unsigned long long body_len;
    unsigned long long body_left;
    size_t trailer_bytes;
    struct ctl ctl;

    /* the response being produced */
    bool keep;           /* Connection header says the connection stays */
    bool frame_chunked;  /* Transfer-Encoding: chunked */
    bool no_body;        /* HEAD, 204, 304 */
    bool cut;            /* body deliberately cut short: no last chunk */
    enum end_action after_body;
    unsigned long long pad_left;
    char suffix[4];
    size_t suffix_len;
    unsigned long long total; /* full body length */
    unsigned long long limit; /* body bytes that will really be sent */
    unsigned long long sent;
};

struct laddr {
    struct sockaddr_storage ss;
    socklen_t len;
    char text[INET6_ADDRSTRLEN + 16];
};

struct worker {
    int idx;
    struct event_base *base;
    struct evconnlistener *lis[MAX_LISTEN];
    int nlis;
    int wake[2]; /* main thread writes here to stop the loop */
    struct event *wake_ev;
    pthread_t tid;
    bool started;
    struct conn *conns;
};

/* ---------------------------------------------------------------- globals */

static atomic_ullong g_conn_total;
static atomic_ullong g_req_total;
static atomic_llong g_conn_open;
static atomic_llong g_in_flight;     /* requests whose head was read and whose response is not finished */
static atomic_llong g_max_in_flight; /* the maximum of g_in_flight since start or the last reset */
static atomic_int g_health_status = 200; /* what GET /healthz answers; set by GET /__health/NNN */
static bool g_quiet;

/* Tag logs (tag=): every request of a tag, in arrival order, shared by all
 * threads behind one mutex held for a few instructions. */
struct tag_entry {
    double received_ms;
    unsigned long long conn;
    int status;       /* the status chosen (0: a reset or close instead) */
    bool abandoned;   /* the connection went away before the response was finished */
    char method[8];
};
struct tag_log {
    char name[TAG_MAX + 1];
    unsigned long long count; /* requests seen, also past TAG_LOG_MAX */
    struct tag_entry *e;      /* TAG_LOG_MAX entries */
};
static pthread_mutex_t g_tag_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tag_log g_tags[TAGS_MAX];
static int g_ntags;
static char g_pad[PAD_SIZE];

/* keys=N bodies: generated once per N, shared read-only by every thread
 * (added to responses by reference) and freed at exit. */
#define KEYS_MAX 4000000
#define KEYS_BODIES 8
struct keys_body {
    long long n;
    char *text;
    size_t len;
};
static pthread_mutex_t g_keys_lock = PTHREAD_MUTEX_INITIALIZER;
static struct keys_body g_keys[KEYS_BODIES];
static int g_nkeys;

/* ---------------------------------------------------------------- small helpers */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;

    if (g_quiet)
        return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        line[sizeof line - 2] = '\n'; /* cut, but still one whole line */
    /* one fputs per line so lines from several threads do not interleave */
    fputs(line, stderr);
}

static int lc(int ch)
{
    return (ch >= 'A' && ch <= 'Z') ? ch + ('a' - 'A') : ch;
}

static bool is_tchar(unsigned char ch)
{
    if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
        return true;
    return ch != 0 && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

/* Case-insensitive compare of a counted string with a literal. */
static bool ieq(const char *a, size_t alen, const char *lit)
{
    size_t n = strlen(lit);
    return alen == n && strncasecmp(a, lit, n) == 0;
}

/* Control names compare case-insensitively with '-' equal to '_', so that
 * chunk_delay (query) and X-Stub-Chunk-Delay (header) are the same. */
static bool ctl_name_eq(const char *a, size_t alen, const char *lit)
{
    size_t i;

    if (alen != strlen(lit))
        return false;
    for (i = 0; i < alen; i++) {
        int ca = lc((unsigned char)a[i]);
        int cb = lit[i];
        if (ca == '-')
            ca = '_';
        if (cb == '-')
            cb = '_';
        if (ca != cb)
            return false;
    }
    return true;
}

static void trim_ows(const char **s, size_t *n)
{
    while (*n && (**s == ' ' || **s == '\t')) {
        (*s)++;
        (*n)--;
    }
    while (*n && ((*s)[*n - 1] == ' ' || (*s)[*n - 1] == '\t'))
        (*n)--;
}

/* Parses a decimal in [lo, hi]; only digits are accepted. */
static bool parse_ll(const char *s, size_t n, long long lo, long long hi, long long *out)
{
    char buf[24];
    char *end;
    long long v;
    size_t i;

    if (n == 0 || n >= sizeof buf)
        return false;
    for (i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    errno = 0;
    v = strtoll(buf, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* An empty value counts as true, so "?echo" works like "?echo=1". */
static bool parse_bool(const char *s, size_t n, bool *out)
{
    if (n == 0 || ieq(s, n, "1") || ieq(s, n, "true") || ieq(s, n, "yes") || ieq(s, n, "on")) {
        *out = true;
        return true;
    }
    if (ieq(s, n, "0") || ieq(s, n, "false") || ieq(s, n, "no") || ieq(s, n, "off")) {
        *out = false;
        return true;
    }
    return false;
}

static bool parse_at(const char *s, size_t n, enum at_point *out)
{
    if (ctl_name_eq(s, n, "before_headers"))
        *out = AT_BEFORE_HEADERS;
    else if (ctl_name_eq(s, n, "after_headers"))
        *out = AT_AFTER_HEADERS;
    else if (ctl_name_eq(s, n, "mid_body"))
        *out = AT_MID_BODY;
    else
        return false;
    return true;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes s into dst (which has room for n bytes: decoding never
 * grows). A malformed %-escape is kept literally. plus: '+' means space. */
static size_t pct_decode(const char *s, size_t n, char *dst, bool plus)
{
    size_t i = 0, o = 0;

    while (i < n) {
        if (s[i] == '%' && i + 2 < n) {
            int hi = hexval((unsigned char)s[i + 1]);
            int lo = hexval((unsigned char)s[i + 2]);
            if (hi >= 0 && lo >= 0) {
                dst[o++] = (char)(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        dst[o++] = (plus && s[i] == '+') ? ' ' : s[i];
        i++;
    }
    return o;
}

static void ms_to_tv(long long ms, struct timeval *tv)
{
    tv->tv_sec = (time_t)(ms / 1000);
    tv->tv_usec = (suseconds_t)((ms % 1000) * 1000);
}

/* Arms the connection's one timer (delay, pacing or linger). The loop's
 * cached time is refreshed first: libevent counts a timeout from the time
 * the current loop iteration began, which under load is several ms before
 * received_ms, and delay=150 must not answer 147 ms after received_ms
 * (the bases use precise timers for the same reason). */
static bool arm_timer(struct conn *c, long long ms)
{
    struct timeval tv;

    event_base_update_cache_time(event_get_base(c->timer));
    ms_to_tv(ms, &tv);
    return evtimer_add(c->timer, &tv) == 0;
}

/* CLOCK_MONOTONIC in milliseconds: the clock Python's time.monotonic()
 * reads on Linux, so a test can compare echo=1's received_ms with its own. */
static double mono_ms(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* A request head was read: it is in flight until its response is finished
 * (or abandoned). /stats itself is not counted. */
static void flight_begin(struct conn *c)
{
    long long now, max;

    c->in_flight = true;
    now = atomic_fetch_add(&g_in_flight, 1) + 1;
    max = atomic_load(&g_max_in_flight);
    while (now > max && !atomic_compare_exchange_weak(&g_max_in_flight, &max, now))
        ;
}

/* The request's response is finished or abandoned; idempotent. */
static void flight_end(struct conn *c)
{
    if (c->in_flight) {
        c->in_flight = false;
        atomic_fetch_sub(&g_in_flight, 1);
    }
}

static const char *reason(int st)
{
    switch (st) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 418: return "I'm a teapot";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
    }
}

/* ---------------------------------------------------------------- output helpers */

/* Output helpers: a failed evbuffer_add marks the connection, and the
 * response is then abandoned with an RST instead of being sent broken. */
static void put(struct conn *c, struct evbuffer *b, const void *d, size_t n)
{
    if (n && evbuffer_add(b, d, n) != 0)
        c->oom = true;
}

static void put_str(struct conn *c, struct evbuffer *b, const char *s)
{
    put(c, b, s, strlen(s));
}

static void putf(struct conn *c, struct evbuffer *b, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void putf(struct conn *c, struct evbuffer *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        c->oom = true;
        return;
    }
    put(c, b, tmp, (size_t)n);
}

/* Length of the valid UTF-8 sequence at s, or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char b = s[0];
    size_t need, i;
    unsigned char lo = 0x80, hi = 0xBF;

    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        need = 1;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 2;
        if (b == 0xE0)
            lo = 0xA0;
        if (b == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3;
        if (b == 0xF0)
            lo = 0x90;
        if (b == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    if (n < need + 1)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (i = 2; i <= need; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return need + 1;
}

/* Appends s as the inside of a JSON string. Valid UTF-8 passes through;
 * a byte that is not valid UTF-8 becomes \u00XX (its Latin-1 reading). */
static void json_esc(struct conn *c, struct evbuffer *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, start = 0;

    while (i < n) {
        unsigned char ch = u[i];
        char esc[8];
        const char *e;
        size_t elen = 2;

        if (ch >= 0x20 && ch < 0x80 && ch != '"' && ch != '\\') {
            i++;
            continue;
        }
        if (ch >= 0x80) {
            size_t l = utf8_len(u + i, n - i);
            if (l) {
                i += l;
                continue;
            }
        }
        put(c, b, s + start, i - start);
        switch (ch) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\n': e = "\\n"; break;
        case '\r': e = "\\r"; break;
        case '\t': e = "\\t"; break;
        case '\b': e = "\\b"; break;
        case '\f': e = "\\f"; break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", (unsigned)ch);
            e = esc;
            elen = 6;
            break;
        }
        put(c, b, e, elen);
        i++;
        start = i;
    }
    put(c, b, s + start, n - start);
}

static void put_json_str(struct conn *c, struct evbuffer *b, const char *s, size_t n)
{
    put(c, b, "\"", 1);
    json_esc(c, b, s, n);
    put(c, b, "\"", 1);
}

/* A JSON integer: "0" or up to 18 digits without a leading zero. */
static bool is_json_int(const char *s, size_t n)
{
    size_t i;

    if (n == 0 || n > 18)
        return false;
    if (s[0] == '0')
        return n == 1;
    for (i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* An id goes out as a number when numeric, else as a string. */
static void put_id(struct conn *c, struct evbuffer *b, const char *s, size_t n)
{
    if (is_json_int(s, n))
        put(c, b, s, n);
    else
        put_json_str(c, b, s, n);
}

/* ---------------------------------------------------------------- connection buffers */

static char *scratch_take(struct conn *c, size_t n)
{
    char *p;

    if (n > 2 * c->head_cap - c->scratch_used)
        return NULL;
    p = c->scratch + c->scratch_used;
    c->scratch_used += n;
    return p;
}

/* Makes head hold need bytes. Only called between requests, when nothing
 * points into the old buffers. scratch is twice the head: it holds every
 * decoded query value plus one more decoded copy of a value and the path. */
static bool conn_reserve(struct conn *c, size_t need)
{
    size_t cap = c->head_cap ? c->head_cap : 4096;
    char *h, *s;

    if (need <= c->head_cap)
        return true;
    while (cap < need)
        cap *= 2;
    if (cap > HEAD_MAX + 1)
        cap = HEAD_MAX + 1;
    h = malloc(cap);
    s = malloc(2 * cap);
    if (!h || !s) {
        free(h);
        free(s);
        return false;
    }
    free(c->head);
    free(c->scratch);
    c->head = h;
    c->scratch = s;
    c->head_cap = cap;
    return true;
}

/* ---------------------------------------------------------------- forward declarations */

static void conn_free(struct conn *c);
static void process_input(struct conn *c);
static void stream_body(struct conn *c);
static void begin_close(struct conn *c, enum end_action action);

/* ---------------------------------------------------------------- request head */

static int bad(struct conn *c, int status, const char *msg)
{
    c->errmsg = msg;
    return status;
}

/* Splits the request target into path and query. Accepts origin-form,
 * absolute-form (a proxy-style "http://host/path") and "*". */
static int split_target(struct conn *c, const char *t, size_t tlen)
{
    const char *q;

    if (tlen >= 7 && (strncasecmp(t, "http://", 7) == 0 || (tlen >= 8 && strncasecmp(t, "https://", 8) == 0))) {
        const char *a = t + (t[4] == ':' ? 7 : 8);
        const char *end = t + tlen;
        const char *p = a;
        while (p < end && *p != '/' && *p != '?')
            p++;
        if (p == end || *p == '?') {
            /* no path: it is "/" and the query (if any) follows */
            c->path = "/";
            c->plen = 1;
            c->query = (p < end) ? p + 1 : "";
            c->qlen = (p < end) ? (size_t)(end - p - 1) : 0;
            return 0;
        }
        tlen -= (size_t)(p - t);
        t = p;
    } else if (!(t[0] == '/' || (tlen == 1 && t[0] == '*'))) {
        return bad(c, 400, "bad request target");
    }
    q = memchr(t, '?', tlen);
    c->path = t;
    c->plen = q ? (size_t)(q - t) : tlen;
    c->query = q ? q + 1 : "";
    c->qlen = q ? tlen - c->plen - 1 : 0;
    return 0;
}

/* Reads a comma-separated header value token by token. */
static bool next_token(const char **s, const char *end, const char **tok, size_t *tlen)
{
    while (*s < end) {
        const char *comma = memchr(*s, ',', (size_t)(end - *s));
        const char *te = comma ? comma : end;
        const char *t = *s;
        size_t n = (size_t)(te - t);

        *s = comma ? comma + 1 : end;
        trim_ows(&t, &n);
        if (n) {
            *tok = t;
            *tlen = n;
            return true;
        }
    }
    return false;
}

/* Parses c->head (c->head_len bytes ending in an empty line).
 * Returns 0 when the head is valid, else the status to answer with. */
static int parse_head(struct conn *c)
{
    char *p = c->head;
    char *end = c->head + c->head_len;
    char *eol, *le, *sp1, *sp2, *t, *v;
    size_t vlen;
    bool te_seen = false, te_chunked = false, te_last_chunked = false, te_other = false;

    eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol)
        return bad(c, 400, "malformed request line");
    le = (eol > p && eol[-1] == '\r') ? eol - 1 : eol;

    /* request line: method SP request-target SP HTTP-version */
    sp1 = memchr(p, ' ', (size_t)(le - p));
    if (!sp1 || sp1 == p)
        return bad(c, 400, "malformed request line");
    for (t = p; t < sp1; t++)
        if (!is_tchar((unsigned char)*t))
            return bad(c, 400, "bad method");
    c->method = p;
    c->mlen = (size_t)(sp1 - p);
    t = sp1 + 1;
    sp2 = memchr(t, ' ', (size_t)(le - t));
    if (!sp2 || sp2 == t)
        return bad(c, 400, "malformed request line");
    for (v = t; v < sp2; v++)
        if ((unsigned char)*v <= 0x20 || (unsigned char)*v == 0x7f)
            return bad(c, 400, "bad request target");
    v = sp2 + 1;
    vlen = (size_t)(le - v);
    if (vlen == 8 && memcmp(v, "HTTP/1.1", 8) == 0)
        c->minor = 1;
    else if (vlen == 8 && memcmp(v, "HTTP/1.0", 8) == 0)
        c->minor = 0;
    else if (vlen >= 5 && memcmp(v, "HTTP/", 5) == 0)
        return bad(c, 505, "only HTTP/1.0 and HTTP/1.1 are supported");
    else
        return bad(c, 400, "malformed request line");
    if (split_target(c, t, (size_t)(sp2 - t)) != 0)
        return 400;

    /* header fields */
    p = eol + 1;
    while (p < end) {
        char *colon, *q;
        const char *val;
        size_t nlen, i;

        eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            return bad(c, 400, "malformed header");
        le = (eol > p && eol[-1] == '\r') ? eol - 1 : eol;
        if (le == p)
            break; /* the empty line ending the head */
        if (*p == ' ' || *p == '\t')
            return bad(c, 400, "obsolete line folding is not accepted");
        colon = memchr(p, ':', (size_t)(le - p));
        if (!colon || colon == p)
            return bad(c, 400, "malformed header");
        for (q = p; q < colon; q++)
            if (!is_tchar((unsigned char)*q))
                return bad(c, 400, "bad header name");
        nlen = (size_t)(colon - p);
        val = colon + 1;
        vlen = (size_t)(le - val);
        trim_ows(&val, &vlen);
        for (i = 0; i < vlen; i++) {
            unsigned char ch = (unsigned char)val[i];
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
                return bad(c, 400, "bad character in header value");
        }
        if (c->nh == MAX_HEADERS)
            return bad(c, 431, "too many header fields");
        c->h[c->nh].name = p;
        c->h[c->nh].nlen = nlen;
        c->h[c->nh].val = val;
        c->h[c->nh].vlen = vlen;
        c->nh++;

        if (ieq(p, nlen, "content-length")) {
            long long n;
            if (!parse_ll(val, vlen, 0, 999999999999999999LL, &n))
                return bad(c, 400, "bad Content-Length");
            if (c->has_clen && n != c->clen)
                return bad(c, 400, "conflicting Content-Length");
            c->has_clen = true;
            c->clen = n;
        } else if (ieq(p, nlen, "transfer-encoding")) {
            const char *s = val, *tok;
            size_t tl;
            te_seen = true;
            while (next_token(&s, val + vlen, &tok, &tl)) {
                if (ieq(tok, tl, "chunked")) {
                    if (te_chunked)
                        return bad(c, 400, "chunked applied twice");
                    te_chunked = te_last_chunked = true;
                } else {
                    te_other = true;
                    te_last_chunked = false;
                }
            }
        } else if (ieq(p, nlen, "connection")) {
            const char *s = val, *tok;
            size_t tl;
            while (next_token(&s, val + vlen, &tok, &tl)) {
                if (ieq(tok, tl, "close"))
                    c->conn_close = true;
                else if (ieq(tok, tl, "keep-alive"))
                    c->conn_keepalive = true;
            }
        } else if (ieq(p, nlen, "expect")) {
            if (ieq(val, vlen, "100-continue"))
                c->expect_continue = true;
        }
        p = eol + 1;
    }

    if (te_seen) {
        if (!te_last_chunked)
            return bad(c, 400, "Transfer-Encoding must end with chunked");
        if (te_other)
            return bad(c, 501, "only the chunked transfer coding is supported");
        /* both framings: chunked wins, and the connection is not reused */
        if (c->has_clen)
            c->conn_close = true;
        c->req_chunked = true;
        c->has_clen = false;
        c->clen = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- controls */

enum ctl_id {
    C_STATUS,
    C_DELAY,
    C_SIZE,
    C_CHUNKED,
    C_CHUNK,
    C_CHUNK_DELAY,
    C_BODY,
    C_BAD_JSON,
    C_TRUNCATE,
    C_WRONG_LENGTH,
    C_CLOSE,
    C_RESET,
    C_ECHO,
    C_HEADER,
    C_KEEPALIVE,
    C_CLOSE_IDLE_MS,
    C_GARBAGE,
    C_CLOSE_IF_REUSED,
    C_RESET_IF_REUSED,
    C_UNFRAMED,
    C_ABORT_ON_EOF,
    C_TRAILING_BYTES,
    C_TRAILING_DELAY_MS,
    C_INTERIM,
    C_PAD_HEADER,
    C_SINK,
    C_TAG,
    C_FAIL_FIRST,
    C_FAIL_STATUS,
    C_FAIL_MODE,
    C_DELAY_FIRST,
    C_RAW,
    C_KEYS,
    C_DELAY_PORT,
    C_BATCH,
    C_BATCH_OMIT,
    C_BATCH_FAIL,
    C_BATCH_DUP,
    C_BATCH_REVERSE,
    C_BATCH_SEP,
    C_COUNT
};

static const char *const ctl_names[C_COUNT] = {
    "status", "delay", "size", "chunked", "chunk", "chunk_delay", "body", "bad_json",
    "truncate", "wrong_length", "close", "reset", "echo", "header", "keepalive",
    "close_idle_ms", "garbage", "close_if_reused", "reset_if_reused", "unframed", "abort_on_eof",
    "trailing_bytes", "trailing_delay_ms", "interim", "pad_header", "sink",
    "tag", "fail_first", "fail_status", "fail_mode", "delay_first", "raw", "keys", "delay_port",
    "batch", "batch_omit", "batch_fail", "batch_dup", "batch_reverse", "batch_sep",
};

static int ctl_lookup(const char *n, size_t len)
{
    int i;

    for (i = 0; i < C_COUNT; i++)
        if (ctl_name_eq(n, len, ctl_names[i]))
            return i;
    return -1;
}

static int bad_ctl(struct conn *c, int id)
{
    snprintf(c->errbuf, sizeof c->errbuf, "bad value for stub control '%s'", ctl_names[id]);
    c->errmsg = c->errbuf;
    return 400;
}

/* header=Name:Value -> an extra response header. CR, LF and NUL are
 * refused so a control can never split the response head. */
static int add_extra(struct conn *c, const char *v, size_t vlen)
{
    const char *colon = memchr(v, ':', vlen);
    const char *name = v, *val;
    size_t nlen, i, len;
    struct kv *x;

    if (!colon || c->ctl.nextra == MAX_EXTRA)
        return bad_ctl(c, C_HEADER);
    nlen = (size_t)(colon - v);
    trim_ows(&name, &nlen);
    if (nlen == 0)
        return bad_ctl(c, C_HEADER);
    for (i = 0; i < nlen; i++)
        if (!is_tchar((unsigned char)name[i]))
            return bad_ctl(c, C_HEADER);
    val = colon + 1;
    len = (size_t)(v + vlen - val);
    trim_ows(&val, &len);
    for (i = 0; i < len; i++)
        if (val[i] == '\r' || val[i] == '\n' || val[i] == '\0')
            return bad_ctl(c, C_HEADER);
    x = &c->ctl.extra[c->ctl.nextra++];
    x->name = name;
    x->nlen = nlen;
    x->val = val;
    x->vlen = len;
    if (ieq(name, nlen, "content-type"))
        c->ctl.ct_override = true;
    return 0;
}

/* Applies one control; the value is already decoded. 0 or 400. */
static int apply_ctl(struct conn *c, int id, const char *v, size_t n)
{
    struct ctl *k = &c->ctl;
    long long x;
    bool ok = true;

    switch (id) {
    case C_STATUS:
        ok = parse_ll(v, n, 200, 599, &x);
        if (ok)
            k->status = (int)x;
        break;
    case C_DELAY: ok = parse_ll(v, n, 0, CTL_MS_MAX, &k->delay_ms); break;
    case C_SIZE: ok = parse_ll(v, n, 0, (long long)CTL_SIZE_MAX, &k->size); break;
    case C_CHUNKED: ok = parse_bool(v, n, &k->chunked); break;
    case C_CHUNK: ok = parse_ll(v, n, 1, BODY_MAX, &k->chunk); break;
    case C_CHUNK_DELAY: ok = parse_ll(v, n, 0, CTL_MS_MAX, &k->chunk_delay_ms); break;
    case C_BODY:
        k->body = v;
        k->body_len = n;
        k->has_body = true;
        break;
    case C_BAD_JSON: ok = parse_bool(v, n, &k->bad_json); break;
    case C_TRUNCATE: ok = parse_ll(v, n, 0, (long long)CTL_SIZE_MAX, &k->truncate); break;
    case C_WRONG_LENGTH: ok = parse_bool(v, n, &k->wrong_length); break;
    case C_CLOSE: ok = parse_at(v, n, &k->close_at); break;
    case C_RESET: ok = parse_at(v, n, &k->reset_at); break;
    case C_ECHO: ok = parse_bool(v, n, &k->echo); break;
    case C_HEADER: return add_extra(c, v, n);
    case C_KEEPALIVE: ok = parse_bool(v, n, &k->keepalive); break;
    case C_CLOSE_IDLE_MS: ok = parse_ll(v, n, 0, CTL_MS_MAX, &k->close_idle_ms); break;
    case C_GARBAGE: ok = parse_bool(v, n, &k->garbage); break;
    case C_CLOSE_IF_REUSED: ok = parse_bool(v, n, &k->close_if_reused); break;
    case C_RESET_IF_REUSED: ok = parse_bool(v, n, &k->reset_if_reused); break;
    case C_UNFRAMED: ok = parse_bool(v, n, &k->unframed); break;
    case C_ABORT_ON_EOF: ok = parse_bool(v, n, &k->abort_on_eof); break;
    case C_TRAILING_BYTES:
        ok = n <= TRAILING_MAX;
        k->trailing = v;
        k->trailing_len = n;
        break;
    case C_PAD_HEADER: ok = parse_ll(v, n, 0, BODY_MAX, &k->pad_header); break;
    case C_SINK: ok = parse_bool(v, n, &k->sink); break;
    case C_TRAILING_DELAY_MS: ok = parse_ll(v, n, 0, CTL_MS_MAX, &k->trailing_delay_ms); break;
    case C_TAG:
        ok = n >= 1 && n <= TAG_MAX;
        for (size_t i = 0; ok && i < n; i++)
            ok = (v[i] >= 'a' && v[i] <= 'z') || (v[i] >= 'A' && v[i] <= 'Z') || (v[i] >= '0' && v[i] <= '9') ||
                 v[i] == '_' || v[i] == '-' || v[i] == '.';
        if (ok) {
            memcpy(k->tag, v, n);
            k->tag[n] = '\0';
        }
        break;
    case C_FAIL_FIRST: ok = parse_ll(v, n, 0, 1000000, &k->fail_first); break;
    case C_FAIL_STATUS:
        ok = parse_ll(v, n, 200, 599, &x);
        if (ok)
            k->fail_status = (int)x;
        break;
    case C_FAIL_MODE:
        if (ieq(v, n, "status"))
            k->fail_mode = FAIL_STATUS;
        else if (ieq(v, n, "reset"))
            k->fail_mode = FAIL_RESET;
        else if (ieq(v, n, "close"))
            k->fail_mode = FAIL_CLOSE;
        else
            ok = false;
        break;
    case C_DELAY_FIRST: ok = parse_ll(v, n, 0, CTL_MS_MAX, &k->delay_first_ms); break;
    case C_RAW:
        k->raw = v;
        k->raw_len = n;
        k->has_raw = true;
        break;
    case C_KEYS: ok = parse_ll(v, n, 0, KEYS_MAX, &k->keys); break;
    case C_DELAY_PORT: ok = parse_ll(v, n, 0, 65535, &k->delay_port); break;
    case C_BATCH:
        ok = n >= 1 && n < 64;
        k->batch = v;
        k->batch_len = n;
        break;
    case C_BATCH_OMIT:
        k->batch_omit = v;
        k->batch_omit_len = n;
        break;
    case C_BATCH_FAIL:
        k->batch_fail = v;
        k->batch_fail_len = n;
        break;
    case C_BATCH_DUP: ok = parse_bool(v, n, &k->batch_dup); break;
    case C_BATCH_REVERSE: ok = parse_bool(v, n, &k->batch_reverse); break;
    case C_BATCH_SEP:
        ok = n == 1;
        k->batch_sep = ok ? v[0] : ',';
        break;
    case C_INTERIM:
        ok = parse_ll(v, n, 100, 199, &x) && x != 101;
        if (ok)
            k->interim = (int)x;
        break;
    default: break;
    }
    return ok ? 0 : bad_ctl(c, id);
}

/* Iterates over name=value pairs of a raw query string. */
static bool qnext(const char **pp, const char *end, const char **n, size_t *nl, const char **v, size_t *vl)
{
    while (*pp < end) {
        const char *p = *pp;
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pe = amp ? amp : end;
        const char *eq;

        *pp = amp ? amp + 1 : end;
        if (pe == p)
            continue;
        eq = memchr(p, '=', (size_t)(pe - p));
        *n = p;
        *nl = (size_t)((eq ? eq : pe) - p);
        *v = eq ? eq + 1 : pe;
        *vl = eq ? (size_t)(pe - eq - 1) : 0;
        return true;
    }
    return false;
}

/* Decodes a query parameter name into nb; false when it is too long to be
 * anything this stub knows. */
static bool qname(const char *n, size_t nl, char *nb, size_t nbsz, size_t *outlen)
{
    if (nl >= nbsz)
        return false;
    *outlen = pct_decode(n, nl, nb, true);
    return true;
}

/* Finds query parameter want; its value is decoded into scratch. */
static bool find_query(struct conn *c, const char *want, const char **val, size_t *vlen)
{
    const char *p = c->query, *end = c->query + c->qlen, *n, *v;
    size_t nl, vl, dl;
    char nb[64];

    while (qnext(&p, end, &n, &nl, &v, &vl)) {
        char *d;
        if (!qname(n, nl, nb, sizeof nb, &dl) || !ieq(nb, dl, want))
            continue;
        d = scratch_take(c, vl);
        if (!d)
            return false;
        *vlen = pct_decode(v, vl, d, true);
        *val = d;
        return true;
    }
    return false;
}

/* The next sep-separated piece of list[*i..len): *s, *n; false at the end. */
static bool list_next(const char *list, size_t len, char sep, size_t *i, const char **s, size_t *n)
{
    size_t j;

    if (*i > len || list == NULL)
        return false;
    for (j = *i; j < len && list[j] != sep; j++)
        ;
    *s = list + *i;
    *n = j - *i;
    *i = j + 1;
    return true;
}

static bool list_has(const char *list, size_t len, const char *v, size_t vlen)
{
    size_t i = 0, n;
    const char *s;

    while (list_next(list, len, ',', &i, &s, &n))
        if (n == vlen && memcmp(s, v, n) == 0)
            return true;
    return false;
}

/* batch=PARAM: finds PARAM's values; batch_fail= makes a request holding
 * one of its values fail with fail_status. */
static void batch_controls(struct conn *c)
{
    struct ctl *k = &c->ctl;
    char name[64];
    size_t i = 0, n;
    const char *s;

    if (k->batch == NULL)
        return;
    memcpy(name, k->batch, k->batch_len);
    name[k->batch_len] = '\0';
    if (!find_query(c, name, &k->batch_vals, &k->batch_vals_len)) {
        k->batch_vals = NULL;
        return;
    }
    while (list_next(k->batch_vals, k->batch_vals_len, k->batch_sep, &i, &s, &n))
        if (list_has(k->batch_fail, k->batch_fail_len, s, n))
            k->status = k->fail_status;
}

/* The batch= body: [{"id":V,"name":"item V","asked":"7,9"},...] for the
 * values asked (asked: PARAM's whole value, so a test sees the chunks),
 * without batch_omit's, reversed or duplicated on demand. */
static void build_batch(struct conn *c, struct evbuffer *b)
{
    const struct ctl *k = &c->ctl;
    const char *s[256];
    size_t n[256], nv = 0, i = 0, j, len;
    bool first = true;

    while (nv < 256 && list_next(k->batch_vals, k->batch_vals_len, k->batch_sep, &i, &s[nv], &n[nv]))
        if (!list_has(k->batch_omit, k->batch_omit_len, s[nv], n[nv]))
            nv++;
    put_str(c, b, "[");
    for (int pass = 0; pass < (k->batch_dup ? 2 : 1); pass++) {
        for (j = 0; j < nv; j++) {
            size_t x = k->batch_reverse ? nv - 1 - j : j;
            char nm[300];
            len = (size_t)snprintf(nm, sizeof nm, "%s %.*s", pass ? "dup" : "item", (int)(n[x] > 200 ? 200 : n[x]),
                                   s[x]);
            put_str(c, b, first ? "{\"id\":" : ",{\"id\":");
            first = false;
            put_id(c, b, s[x], n[x]);
            put_str(c, b, ",\"name\":");
            put_json_str(c, b, nm, len);
            put_str(c, b, ",\"asked\":");
            put_json_str(c, b, k->batch_vals, k->batch_vals_len);
            put_str(c, b, "}");
        }
    }
    put_str(c, b, "]");
}

/* Health checks: GET /healthz answers the status last set by GET
 * /__health/NNN (200 at start; NNN 100-599), so a test can make one stub
 * unhealthy and healthy again. Controls in the query still apply. */
static void health_controls(struct conn *c)
{
    const char *pre = "/__health/";
    size_t pl = strlen(pre);
    if (c->plen == 8 && memcmp(c->path, "/healthz", 8) == 0) {
        c->ctl.status = atomic_load(&g_health_status);
    } else if (c->plen == pl + 3 && memcmp(c->path, pre, pl) == 0) {
        int v = 0;
        for (size_t i = pl; i < c->plen && c->path[i] >= '0' && c->path[i] <= '9'; i++)
            v = v * 10 + (c->path[i] - '0');
        if (v >= 100 && v <= 599)
            atomic_store(&g_health_status, v);
        else
            c->ctl.status = 400;
    }
}

/* GET or HEAD /stats or /log: the counters and the tag logs, not counted
 * as in flight and never logged under a tag. */
static bool is_stats(const struct conn *c)
{
    return ((c->plen == 6 && memcmp(c->path, "/stats", 6) == 0) || (c->plen == 4 && memcmp(c->path, "/log", 4) == 0)) &&
           ((c->mlen == 3 && memcmp(c->method, "GET", 3) == 0) || (c->mlen == 4 && memcmp(c->method, "HEAD", 4) == 0));
}

/* Fills c->ctl from X-Stub-* headers, then from the query string (so the
 * query wins for single-valued controls). Returns 0 or an error status. */

static int parse_controls(struct conn *c)
{
    struct ctl *k = &c->ctl;
    const char *p = c->query, *end = c->query + c->qlen, *n, *v;
    size_t nl, vl, dl;
    char nb[64];
    int i, id, st;

    memset(k, 0, sizeof *k);
    k->status = 200;
    k->size = -1;
    k->keys = -1;
    k->chunk = 4096;
    k->truncate = -1;
    k->keepalive = true;
    k->fail_status = 503;
    k->batch_sep = ',';

    for (i = 0; i < c->nh; i++) {
        const struct hdr *h = &c->h[i];
        if (h->nlen <= 7 || strncasecmp(h->name, "x-stub-", 7) != 0)
            continue;
        id = ctl_lookup(h->name + 7, h->nlen - 7);
        if (id < 0) {
            snprintf(c->errbuf, sizeof c->errbuf, "unknown stub control header '%.*s'",
                     (int)(h->nlen > 64 ? 64 : h->nlen), h->name);
            c->errmsg = c->errbuf;
            return 400;
        }
        st = apply_ctl(c, id, h->val, h->vlen);
        if (st)
            return st;
    }
    while (qnext(&p, end, &n, &nl, &v, &vl)) {
        char *d;
        size_t len;
        if (!qname(n, nl, nb, sizeof nb, &dl))
            continue;
        id = ctl_lookup(nb, dl);
        if (id < 0)
            continue; /* not a control: e.g. user= of /orders */
        d = scratch_take(c, vl);
        if (!d)
            return bad(c, 431, "query too large");
        len = pct_decode(v, vl, d, true);
        /* /stats?reset=1 resets max_in_flight; reset=WHERE stays a control */
        if (id == C_RESET && is_stats(c) && parse_bool(d, len, &k->stats_reset)) {
            k->log_reset = k->stats_reset;
            continue;
        }
        st = apply_ctl(c, id, d, len);
        if (st)
            return st;
    }
    return 0;
}

/* ---------------------------------------------------------------- response bodies */

static bool method_is(const struct conn *c, const char *m)
{
    size_t n = strlen(m);
    return c->mlen == n && memcmp(c->method, m, n) == 0;
}

static bool path_is(const struct conn *c, const char *lit)
{
    size_t n = strlen(lit);
    return c->plen == n && memcmp(c->path, lit, n) == 0;
}

/* /prefix/{id} with a non-empty id and nothing after it. */
static bool path_param(struct conn *c, const char *prefix, const char **id, size_t *idlen)
{
    size_t n = strlen(prefix);
    const char *rest;
    size_t rlen;
    char *d;

    if (c->plen <= n || memcmp(c->path, prefix, n) != 0)
        return false;
    rest = c->path + n;
    rlen = c->plen - n;
    if (memchr(rest, '/', rlen))
        return false;
    d = scratch_take(c, rlen);
    if (!d)
        return false;
    *idlen = pct_decode(rest, rlen, d, false);
    *id = d;
    return *idlen > 0;
}

static void put_user_param(struct conn *c, struct evbuffer *b)
{
    const char *u;
    size_t ul;

    put_str(c, b, "{\"user\":");
    if (find_query(c, "user", &u, &ul))
        put_id(c, b, u, ul);
    else
        put_str(c, b, "null");
}

/* Logs the request under its tag and applies fail_first / delay_first.
 * Called once per request, when it is complete. */
static void tag_request(struct conn *c)
{
    struct ctl *k = &c->ctl;
    struct tag_log *t = NULL;
    unsigned long long n;
    int i;

    c->tag_idx = -1;
    if (k->tag[0] == '\0' || is_stats(c))
        return;
    pthread_mutex_lock(&g_tag_lock);
    for (i = 0; i < g_ntags; i++)
        if (strcmp(g_tags[i].name, k->tag) == 0)
            break;
    if (i == g_ntags && g_ntags < TAGS_MAX) {
        t = &g_tags[i];
        if (t->e == NULL)
            t->e = calloc(TAG_LOG_MAX, sizeof(struct tag_entry));
        if (t->e != NULL) {
            memcpy(t->name, k->tag, sizeof t->name);
            t->count = 0;
            g_ntags++;
        }
    }
    if (i < g_ntags) {
        t = &g_tags[i];
        n = ++t->count;
        if (n <= (unsigned long long)k->fail_first) {
            if (k->fail_mode == FAIL_RESET)
                k->reset_at = AT_BEFORE_HEADERS;
            else if (k->fail_mode == FAIL_CLOSE)
                k->close_at = AT_BEFORE_HEADERS;
            else
                k->status = k->fail_status;
        }
        if (n == 1 && k->delay_first_ms > 0)
            k->delay_ms = k->delay_first_ms;
        if (n <= TAG_LOG_MAX) {
            struct tag_entry *e = &t->e[n - 1];
            size_t ml = c->mlen < sizeof e->method - 1 ? c->mlen : sizeof e->method - 1;
            e->received_ms = c->received_ms;
            e->conn = c->id;
            e->status = (k->reset_at == AT_BEFORE_HEADERS || k->close_at == AT_BEFORE_HEADERS) ? 0 : k->status;
            e->abandoned = false;
            memcpy(e->method, c->method, ml);
            e->method[ml] = '\0';
            c->tag_idx = i;
            c->tag_entry = (long)(n - 1);
        }
    }
    pthread_mutex_unlock(&g_tag_lock);
}

/* The request's response was given up (the connection went away first). */
static void tag_abandoned(struct conn *c)
{
    if (c->tag_idx < 0)
        return;
    pthread_mutex_lock(&g_tag_lock);
    g_tags[c->tag_idx].e[c->tag_entry].abandoned = true;
    pthread_mutex_unlock(&g_tag_lock);
    c->tag_idx = -1;
}

/* GET /log?tag=T: {"tag":"T","count":N,"requests":[{"ms":..,"conn":..,
 * "method":"GET","status":503,"abandoned":false},...]}; /log?reset=1
 * forgets every tag. */
static void build_log(struct conn *c, struct evbuffer *b)
{
    int i;
    unsigned long long j, shown;

    pthread_mutex_lock(&g_tag_lock);
    if (c->ctl.log_reset) {
        for (i = 0; i < g_ntags; i++) {
            g_tags[i].name[0] = '\0';
            g_tags[i].count = 0;
        }
        g_ntags = 0;
        pthread_mutex_unlock(&g_tag_lock);
        put_str(c, b, "{\"reset\":true}");
        return;
    }
    for (i = 0; i < g_ntags; i++)
        if (strcmp(g_tags[i].name, c->ctl.tag) == 0)
            break;
    put_str(c, b, "{\"tag\":");
    put_json_str(c, b, c->ctl.tag, strlen(c->ctl.tag));
    putf(c, b, ",\"count\":%llu,\"requests\":[", i < g_ntags ? g_tags[i].count : 0ull);
    shown = i < g_ntags ? (g_tags[i].count < TAG_LOG_MAX ? g_tags[i].count : TAG_LOG_MAX) : 0;
    for (j = 0; j < shown; j++) {
        const struct tag_entry *e = &g_tags[i].e[j];
        putf(c, b, "%s{\"ms\":%.3f,\"conn\":%llu,\"method\":\"%s\",\"status\":%d,\"abandoned\":%s}", j ? "," : "",
             e->received_ms, e->conn, e->method, e->status, e->abandoned ? "true" : "false");
    }
    put_str(c, b, "]}");
    pthread_mutex_unlock(&g_tag_lock);
}

/* The demo and benchmark paths; false when the path is not one of them. */
static bool build_builtin(struct conn *c, struct evbuffer *b)
{
    const char *id;
    size_t il;

    if (!method_is(c, "GET") && !method_is(c, "HEAD"))
        return false;
    if (path_is(c, "/log")) {
        build_log(c, b);
    } else if (path_is(c, "/static")) {
        put_str(c, b, "{\"hello\":\"world\"}");
    } else if (path_is(c, "/stats")) {
        if (c->ctl.stats_reset)
            atomic_store(&g_max_in_flight, atomic_load(&g_in_flight));
        putf(c, b,
             "{\"connections\":%llu,\"requests\":%llu,\"open_connections\":%lld,\"in_flight\":%lld,"
             "\"max_in_flight\":%lld}",
             (unsigned long long)atomic_load(&g_conn_total), (unsigned long long)atomic_load(&g_req_total),
             (long long)atomic_load(&g_conn_open), (long long)atomic_load(&g_in_flight),
             (long long)atomic_load(&g_max_in_flight));
    } else if (path_param(c, "/users/", &id, &il)) {
        put_str(c, b, "{\"id\":");
        put_id(c, b, id, il);
        put_str(c, b, ",\"name\":\"User ");
        json_esc(c, b, id, il);
        put_str(c, b, "\",\"email\":\"user");
        json_esc(c, b, id, il);
        put_str(c, b, "@example.com\",\"tier\":\"gold\"}");
    } else if (path_param(c, "/products/", &id, &il)) {
        put_str(c, b, "{\"id\":");
        put_id(c, b, id, il);
        put_str(c, b, ",\"name\":\"Product ");
        json_esc(c, b, id, il);
        put_str(c, b, "\",\"price\":9.99}");
    } else if (path_is(c, "/orders")) {
        put_user_param(c, b);
        put_str(c, b, ",\"items\":[{\"id\":101,\"product_id\":7,\"qty\":1},"
                      "{\"id\":102,\"product_id\":9,\"qty\":2}]}");
    } else if (path_is(c, "/recommendations")) {
        put_user_param(c, b);
        put_str(c, b, ",\"items\":[1,2,3]}");
    } else {
        return false;
    }
    return true;
}

/* echo=1: a JSON description of the request as received. */
static void build_echo(struct conn *c, struct evbuffer *b)
{
    int i, j;
    bool first = true;
    size_t blen = evbuffer_get_length(c->body);
    const char *body = "";

    put_str(c, b, "{\"method\":");
    put_json_str(c, b, c->method, c->mlen);
    put_str(c, b, ",\"path\":");
    put_json_str(c, b, c->path, c->plen);
    put_str(c, b, ",\"query\":");
    put_json_str(c, b, c->query, c->qlen);
    put_str(c, b, ",\"headers\":{");
    /* names are tokens: lowercasing in place is safe, and they need no
     * escaping; repeated names are joined in order with ", " */
    for (i = 0; i < c->nh; i++) {
        size_t k;
        for (k = 0; k < c->h[i].nlen; k++)
            c->h[i].name[k] = (char)lc((unsigned char)c->h[i].name[k]);
    }
    for (i = 0; i < c->nh; i++) {
        bool dup = false;
        for (j = 0; j < i && !dup; j++)
            dup = c->h[j].nlen == c->h[i].nlen && memcmp(c->h[j].name, c->h[i].name, c->h[i].nlen) == 0;
        if (dup)
            continue;
        if (!first)
            put(c, b, ",", 1);
        first = false;
        put(c, b, "\"", 1);
        put(c, b, c->h[i].name, c->h[i].nlen);
        put(c, b, "\":\"", 3);
        json_esc(c, b, c->h[i].val, c->h[i].vlen);
        for (j = i + 1; j < c->nh; j++) {
            if (c->h[j].nlen != c->h[i].nlen || memcmp(c->h[j].name, c->h[i].name, c->h[i].nlen) != 0)
                continue;
            put(c, b, ", ", 2);
            json_esc(c, b, c->h[j].val, c->h[j].vlen);
        }
        put(c, b, "\"", 1);
    }
    put_str(c, b, "},\"body\":\"");
    if (blen) {
        body = (const char *)evbuffer_pullup(c->body, -1);
        if (!body) {
            c->oom = true;
            return;
        }
    }
    json_esc(c, b, body, blen);
    putf(c, b, "\",\"body_length\":%llu,\"connection_requests\":%llu,\"connection_id\":%llu,\"received_ms\":%.3f}",
         c->body_len, c->nreq, c->id, c->received_ms);
}

/* The keys=n body {"k0":0,"k1":1,...} (built on first use; lives until
 * exit), or NULL when KEYS_BODIES other sizes were asked for already. */
static const struct keys_body *keys_body(long long n)
{
    const struct keys_body *found = NULL;

    pthread_mutex_lock(&g_keys_lock);
    for (int i = 0; i < g_nkeys && !found; i++)
        if (g_keys[i].n == n)
            found = &g_keys[i];
    if (!found && g_nkeys < KEYS_BODIES) {
        size_t cap = 2 + (size_t)n * 24, len = 0;
        char *t = malloc(cap);
        if (t) {
            t[len++] = '{';
            for (long long i = 0; i < n; i++)
                len += (size_t)snprintf(t + len, cap - len, "%s\"k%lld\":%lld", i ? "," : "", i, i);
            t[len++] = '}';
            g_keys[g_nkeys].n = n;
            g_keys[g_nkeys].text = t;
            g_keys[g_nkeys].len = len;
            found = &g_keys[g_nkeys++];
        }
    }
    pthread_mutex_unlock(&g_keys_lock);
    return found;
}

/* Builds the response body: the whole of it goes into c->prefix, except
 * for size= where only {"data":" does and the rest is generated while
 * sending (pad_left bytes of 'x', then the suffix "}). Precedence:
 * echo > bad_json > body > batch > keys > size > built-in path > default. */
static void build_body(struct conn *c)
{
    struct evbuffer *b = c->prefix;
    const struct ctl *k = &c->ctl;

    evbuffer_drain(b, evbuffer_get_length(b));
    c->pad_left = 0;
    c->suffix_len = 0;
    if (k->sink) {
        putf(c, b, "{\"received\":%llu}", c->body_len);
    } else if (k->echo) {
        build_echo(c, b);
    } else if (k->bad_json) {
        put_str(c, b, "{\"broken\": ");
    } else if (k->has_body) {
        put(c, b, k->body, k->body_len);
    } else if (k->batch_vals) {
        build_batch(c, b);
    } else if (k->keys >= 0) {
        const struct keys_body *kb = keys_body(k->keys);
        if (kb == NULL || evbuffer_add_reference(b, kb->text, kb->len, NULL, NULL) != 0)
            c->oom = true;
    } else if (k->size >= 0) {
        if (k->size >= 11) {
            put_str(c, b, "{\"data\":\"");
            c->pad_left = (unsigned long long)k->size - 11;
            memcpy(c->suffix, "\"}", 2);
            c->suffix_len = 2;
        } else if (k->size > 0) {
            put_str(c, b, "{\"data\":\"\"}"); /* the smallest body of this shape */
        }
    } else if (!build_builtin(c, b)) {
        put_str(c, b, "{\"ok\":true,\"path\":");
        put_json_str(c, b, c->path, c->plen);
        put_str(c, b, "}");
    }
}

/* Moves n bytes of 'x' padding to out: small pieces by copy (cheaper than a
 * chain each), big ones by reference to the static block. */
static void emit_pad(struct conn *c, struct evbuffer *out, unsigned long long n)
{
    while (n) {
        size_t piece = n > PAD_SIZE ? PAD_SIZE : (size_t)n;
        int rc;
        if (piece >= REF_MIN)
            rc = evbuffer_add_reference(out, g_pad, piece, NULL, NULL);
        else
            rc = evbuffer_add(out, g_pad, piece);
        if (rc != 0) {
            c->oom = true;
            return;
        }
        n -= piece;
    }
}

/* Moves the next n body bytes (prefix, padding, suffix) to out. */
static void emit_body(struct conn *c, struct evbuffer *out, size_t n)
{
    size_t plen = evbuffer_get_length(c->prefix);

    if (n && plen) {
        size_t k = n < plen ? n : plen;
        if (evbuffer_remove_buffer(c->prefix, out, k) != (int)k)
            c->oom = true;
        n -= k;
    }
    if (n && c->pad_left) {
        unsigned long long k = n < c->pad_left ? n : c->pad_left;
        emit_pad(c, out, k);
        c->pad_left -= k;
        n -= (size_t)k;
    }
    if (n && c->suffix_len) {
        size_t k = n < c->suffix_len ? n : c->suffix_len;
        put(c, out, c->suffix, k);
        memmove(c->suffix, c->suffix + k, c->suffix_len - k);
        c->suffix_len -= k;
    }
}

/* ---------------------------------------------------------------- response flow */

/* Ends the current response: back to parsing, or closing, or stuck. */
static void finish_response(struct conn *c)
{
    flight_end(c);
    c->tag_idx = -1;
    evbuffer_drain(c->prefix, evbuffer_get_length(c->prefix));
    evbuffer_drain(c->body, evbuffer_get_length(c->body));
    c->pad_left = 0;
    c->suffix_len = 0;
    switch (c->after_body) {
    case END_KEEP:
        c->state = S_IDLE;
        c->pstate = P_HEAD;
        /* trailing_bytes: unsolicited bytes after the response, at once or
         * after trailing_delay_ms of idleness (a new request cancels) */
        if (c->ctl.trailing_len > 0 && c->ctl.trailing_delay_ms == 0) {
            put(c, bufferevent_get_output(c->bev), c->ctl.trailing, c->ctl.trailing_len);
        } else if (c->ctl.trailing_len > 0) {
            memcpy(c->idle_bytes, c->ctl.trailing, c->ctl.trailing_len);
            c->idle_bytes_len = c->ctl.trailing_len;
            c->idle_send = arm_timer(c, c->ctl.trailing_delay_ms);
        }
        /* close_idle_ms: close once idle that long (a new request cancels) */
        else if (c->ctl.close_idle_ms > 0)
            c->idle_close = arm_timer(c, c->ctl.close_idle_ms);
        break;
    case END_FIN:
    case END_RST:
        begin_close(c, c->after_body);
        break;
    case END_STUCK: {
        struct evbuffer *in = bufferevent_get_input(c->bev);
        c->state = S_STUCK;
        evbuffer_drain(in, evbuffer_get_length(in));
        break;
    }
    }
}

/* Sends the response head (after any delay), then starts the body. */
static void send_response(struct conn *c)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    const struct ctl *k = &c->ctl;
    bool close_delimited, is_head;
    char hb[512];
    size_t off = 0;
    int n, i;

    logmsg("gw_stub: conn %llu req %llu: %.*s %.*s%s%.*s -> %d\n", c->id, c->nreq, (int)c->mlen, c->method,
           (int)c->plen, c->path, c->qlen ? "?" : "", (int)c->qlen, c->query, k->status);

    if (k->reset_at == AT_BEFORE_HEADERS) {
        begin_close(c, END_RST);
        return;
    }
    if (k->close_at == AT_BEFORE_HEADERS) {
        begin_close(c, END_FIN);
        return;
    }
    /* close_if_reused / reset_if_reused: only a reused connection dies */
    if (c->nreq > 1 && (k->reset_if_reused || k->close_if_reused)) {
        logmsg("gw_stub: conn %llu req %llu: reused connection %s\n", c->id, c->nreq,
               k->reset_if_reused ? "reset" : "closed");
        begin_close(c, k->reset_if_reused ? END_RST : END_FIN);
        return;
    }
    if (k->garbage) {
        put_str(c, out, "THIS IS NOT HTTP\r\n\r\n");
        begin_close(c, c->oom ? END_RST : END_FIN);
        return;
    }
    if (k->has_raw) {
        /* raw=: these bytes in place of a response, streamed as a body is
         * (chunk= pieces chunk_delay= apart), then FIN */
        evbuffer_drain(c->prefix, evbuffer_get_length(c->prefix));
        put(c, c->prefix, k->raw, k->raw_len);
        c->pad_left = 0;
        c->suffix_len = 0;
        c->total = c->limit = k->raw_len;
        c->no_body = c->frame_chunked = c->cut = false;
        c->after_body = c->oom ? END_RST : END_FIN;
        c->sent = 0;
        c->state = S_STREAM;
        stream_body(c);
        return;
    }

    build_body(c);
    c->total = evbuffer_get_length(c->prefix) + c->pad_left + c->suffix_len;
    is_head = method_is(c, "HEAD");
    if (k->status == 204 || k->status == 304) {
        /* these never carry a body, whatever the controls say */
        evbuffer_drain(c->prefix, evbuffer_get_length(c->prefix));
        c->pad_left = 0;
        c->suffix_len = 0;
        c->total = 0;
    }
    c->no_body = is_head || k->status == 204 || k->status == 304;
    /* HTTP/1.0 has no chunked coding: such a body is delimited by close */
    close_delimited = (k->chunked && c->minor == 0) || (k->unframed && k->status != 204 && k->status != 304);
    c->frame_chunked = k->chunked && !k->unframed && c->minor == 1 && k->status != 204 && k->status != 304;

    if (k->interim)
        putf(c, out, "HTTP/1.1 %d Interim\r\nX-Interim: 1\r\n\r\n", k->interim);
    n = snprintf(hb, sizeof hb, "HTTP/1.1 %d %s\r\nServer: gw_stub\r\nX-Stub-Port: %u\r\n%s", k->status,
                 reason(k->status), c->lport, k->ct_override ? "" : "Content-Type: application/json\r\n");
    if (n < 0 || (size_t)n >= sizeof hb)
        goto oom;
    off = (size_t)n;
    if (c->frame_chunked)
        n = snprintf(hb + off, sizeof hb - off, "Transfer-Encoding: chunked\r\n");
    else if (!close_delimited && k->status != 204 && k->status != 304)
        n = snprintf(hb + off, sizeof hb - off, "Content-Length: %llu\r\n",
                     c->total + (k->wrong_length ? 10ull : 0ull));
    else
        n = 0;
    if (n < 0 || (size_t)n >= sizeof hb - off)
        goto oom;
    off += (size_t)n;
    if (!c->keep || close_delimited)
        n = snprintf(hb + off, sizeof hb - off, "Connection: close\r\n");
    else if (c->minor == 0)
        n = snprintf(hb + off, sizeof hb - off, "Connection: keep-alive\r\n");
    else
        n = 0;
    if (n < 0 || (size_t)n >= sizeof hb - off)
        goto oom;
    off += (size_t)n;
    put(c, out, hb, off);
    for (i = 0; i < k->nextra; i++) {
        put(c, out, k->extra[i].name, k->extra[i].nlen);
        put(c, out, ": ", 2);
        put(c, out, k->extra[i].val, k->extra[i].vlen);
        put(c, out, "\r\n", 2);
    }
    if (k->pad_header > 0) {
        put_str(c, out, "X-Pad: ");
        emit_pad(c, out, (unsigned long long)k->pad_header);
        put(c, out, "\r\n", 2);
    }
    put(c, out, "\r\n", 2);
    if (c->oom)
        goto oom;

    /* what happens once the body bytes are out */
    if (k->reset_at != AT_NONE)
        c->after_body = END_RST;
    else if (k->close_at != AT_NONE || k->truncate >= 0 || close_delimited || !c->keep)
        c->after_body = END_FIN;
    else if (k->wrong_length && !c->frame_chunked && !c->no_body)
        c->after_body = END_STUCK;
    else
        c->after_body = END_KEEP;

    if (k->reset_at == AT_AFTER_HEADERS || k->close_at == AT_AFTER_HEADERS) {
        finish_response(c);
        return;
    }
    c->limit = c->no_body ? 0 : c->total;
    c->cut = false;
    if (k->truncate >= 0 && (unsigned long long)k->truncate < c->limit) {
        c->limit = (unsigned long long)k->truncate;
        c->cut = true;
    }
    if (k->reset_at == AT_MID_BODY || k->close_at == AT_MID_BODY) {
        if (c->limit > c->total / 2)
            c->limit = c->total / 2;
        c->cut = true;
    }
    c->sent = 0;
    c->state = S_STREAM;
    stream_body(c);
    return;
oom:
    begin_close(c, END_RST);
}

/* Produces body pieces until done, the output is full, or a chunk_delay
 * pause starts. Chunked framing and chunk_delay= send chunk= sized pieces;
 * otherwise pieces are as big as the output allows. */
static void stream_body(struct conn *c)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    const struct ctl *k = &c->ctl;
    bool paced = c->frame_chunked || k->chunk_delay_ms > 0;

    while (c->sent < c->limit) {
        unsigned long long left = c->limit - c->sent;
        size_t piece;

        if (evbuffer_get_length(out) >= OUT_HIGH) {
            c->state = S_STREAM; /* the write callback resumes */
            return;
        }
        piece = paced ? (size_t)k->chunk : OUT_HIGH;
        if ((unsigned long long)piece > left)
            piece = (size_t)left;
        if (c->frame_chunked)
            putf(c, out, "%zx\r\n", piece);
        emit_body(c, out, piece);
        if (c->frame_chunked)
            put(c, out, "\r\n", 2);
        c->sent += piece;
        if (c->oom) {
            begin_close(c, END_RST);
            return;
        }
        if (k->chunk_delay_ms > 0 && c->sent < c->limit) {
            c->state = S_CHUNK_WAIT;
            if (!arm_timer(c, k->chunk_delay_ms))
                begin_close(c, END_RST);
            return;
        }
    }
    if (c->frame_chunked && !c->cut && !c->no_body)
        put(c, out, "0\r\n\r\n", 5);
    if (c->oom) {
        begin_close(c, END_RST);
        return;
    }
    finish_response(c);
}

/* A request is complete: count it, then answer now or after delay=. */
static void start_request(struct conn *c)
{
    const struct ctl *k = &c->ctl;

    c->nreq++;
    atomic_fetch_add(&g_req_total, 1);
    tag_request(c);
    if (c->idle_close || c->idle_send) {
        evtimer_del(c->timer);
        c->idle_close = c->idle_send = false;
    }
    c->keep = (c->minor == 1 ? !c->conn_close : (c->conn_keepalive && !c->conn_close)) && k->keepalive;
    if (k->delay_ms > 0 && (k->delay_port == 0 || k->delay_port == (long long)c->lport)) {
        c->state = S_DELAY;
        if (!arm_timer(c, k->delay_ms))
            begin_close(c, END_RST);
        return;
    }
    send_response(c);
}

/* Answers a request that could not be parsed, then closes. */
static void send_error(struct conn *c, int status)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    struct evbuffer *b = c->prefix;
    const char *msg = c->errmsg ? c->errmsg : reason(status);
    size_t blen;

    logmsg("gw_stub: conn %llu: bad request -> %d (%s)\n", c->id, status, msg);
    evbuffer_drain(b, evbuffer_get_length(b));
    put_str(c, b, "{\"error\":");
    put_json_str(c, b, msg, strlen(msg));
    put_str(c, b, "}");
    blen = evbuffer_get_length(b);
    putf(c, out,
         "HTTP/1.1 %d %s\r\nServer: gw_stub\r\nX-Stub-Port: %u\r\nContent-Type: application/json\r\n"
         "Content-Length: %zu\r\nConnection: close\r\n\r\n",
         status, reason(status), c->lport, blen);
    if (evbuffer_add_buffer(out, b) != 0)
        c->oom = true;
    begin_close(c, c->oom ? END_RST : END_FIN);
}

/* ---------------------------------------------------------------- request parsing on the input buffer */

/* The request body limit: 16 MiB, or 2^40 bytes for sink=1, whose body is
 * counted and dropped as it arrives (never held). */
static unsigned long long body_max(const struct conn *c)
{
    return c->ctl.sink ? CTL_SIZE_MAX : BODY_MAX;
}

/* Request body bytes: kept for echo=1 (unless sink=1), dropped otherwise. */
static int take_body(struct conn *c, struct evbuffer *in, size_t n)
{
    if (c->ctl.echo && !c->ctl.sink) {
        if (evbuffer_remove_buffer(in, c->body, n) != (int)n)
            return bad(c, 500, "out of memory");
    } else {
        evbuffer_drain(in, n);
    }
    c->body_len += n;
    c->body_left -= n;
    return 0;
}

/* Takes one line (CRLF or LF) of at most CHUNK_LINE_MAX bytes into buf.
 * 1: got it, 0: need more input, -1: too long. */
static int take_line(struct evbuffer *in, char *buf, size_t *len)
{
    size_t eol_len = 0;
    struct evbuffer_ptr p = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);

    if (p.pos < 0)
        return evbuffer_get_length(in) > CHUNK_LINE_MAX ? -1 : 0;
    if ((size_t)p.pos > CHUNK_LINE_MAX)
        return -1;
    evbuffer_remove(in, buf, (size_t)p.pos);
    buf[p.pos] = '\0';
    evbuffer_drain(in, eol_len);
    *len = (size_t)p.pos;
    return 1;
}

/* Parses as far as the input allows. Returns R_MORE, R_READY (a whole
 * request is in c) or an HTTP error status. */
static int parse_some(struct conn *c, struct evbuffer *in)
{
    char line[CHUNK_LINE_MAX + 1];
    size_t len;
    int r;

    for (;;) {
        switch (c->pstate) {
        case P_HEAD: {
            struct evbuffer_ptr pos;
            unsigned char first;
            size_t hlen;
            int st;

            /* empty lines before a request line are ignored (RFC 9112 2.2) */
            while (evbuffer_copyout(in, &first, 1) == 1 && (first == '\r' || first == '\n'))
                evbuffer_drain(in, 1);
            len = evbuffer_get_length(in);
            if (len == 0)
                return R_MORE;
            pos = evbuffer_search(in, "\r\n\r\n", 4, NULL);
            if (pos.pos < 0)
                return len > HEAD_MAX ? bad(c, 431, "request head larger than 64 KiB") : R_MORE;
            hlen = (size_t)pos.pos + 4;
            if (hlen > HEAD_MAX)
                return bad(c, 431, "request head larger than 64 KiB");
            if (!conn_reserve(c, hlen + 1))
                return bad(c, 500, "out of memory");
            if (evbuffer_remove(in, c->head, hlen) != (int)hlen)
                return bad(c, 500, "cannot read the request head");
            c->head[hlen] = '\0';
            c->head_len = hlen;
            c->received_ms = mono_ms();
            c->scratch_used = 0;
            c->nh = 0;
            c->clen = 0;
            c->has_clen = c->req_chunked = c->conn_close = c->conn_keepalive = c->expect_continue = false;
            c->body_len = c->body_left = 0;
            c->trailer_bytes = 0;
            c->errmsg = NULL;
            evbuffer_drain(c->body, evbuffer_get_length(c->body));
            st = parse_head(c);
            if (st)
                return st;
            st = parse_controls(c);
            if (st)
                return st;
            health_controls(c);
            batch_controls(c);
            if (!is_stats(c))
                flight_begin(c);
            /* a sink takes big bodies: read in 256 KiB gulps, not 16 KiB */
            if (c->ctl.sink)
                (void)bufferevent_set_max_single_read(c->bev, READ_HIGH);
            if (c->req_chunked) {
                c->pstate = P_CHUNK_SIZE;
            } else if (c->clen > 0) {
                if (c->clen > (long long)body_max(c))
                    return bad(c, 413, "request body larger than 16 MiB");
                c->body_left = (unsigned long long)c->clen;
                c->pstate = P_BODY;
            } else {
                return R_READY;
            }
            /* the client waits for this before sending the body */
            if (c->expect_continue && c->minor == 1 && evbuffer_get_length(in) == 0)
                put_str(c, bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n");
            break;
        }
        case P_BODY:
        case P_CHUNK_DATA: {
            size_t avail = evbuffer_get_length(in);
            size_t k;
            if (avail == 0)
                return R_MORE;
            k = (unsigned long long)avail < c->body_left ? avail : (size_t)c->body_left;
            r = take_body(c, in, k);
            if (r)
                return r;
            if (c->body_left)
                return R_MORE;
            if (c->pstate == P_BODY) {
                c->pstate = P_HEAD;
                return R_READY;
            }
            c->pstate = P_CHUNK_CRLF;
            break;
        }
        case P_CHUNK_SIZE: {
            unsigned long long size = 0;
            size_t i, digits = 0;
            r = take_line(in, line, &len);
            if (r == 0)
                return R_MORE;
            if (r < 0)
                return bad(c, 400, "chunk size line too long");
            for (i = 0; i < len && hexval((unsigned char)line[i]) >= 0; i++) {
                size = size * 16 + (unsigned long long)hexval((unsigned char)line[i]);
                if (++digits > 8 || size > BODY_MAX)
                    return bad(c, 413, "request body larger than 16 MiB");
            }
            /* after the digits only whitespace and ;extensions may follow */
            while (i < len && (line[i] == ' ' || line[i] == '\t'))
                i++;
            if (digits == 0 || (i < len && line[i] != ';'))
                return bad(c, 400, "bad chunk size");
            if (c->body_len + size > body_max(c))
                return bad(c, 413, "request body larger than 16 MiB");
            if (size == 0) {
                c->pstate = P_TRAILER;
            } else {
                c->body_left = size;
                c->pstate = P_CHUNK_DATA;
            }
            break;
        }
        case P_CHUNK_CRLF: {
            unsigned char two[2];
            size_t got = (size_t)evbuffer_copyout(in, two, 2);
            if (got >= 1 && two[0] == '\n') {
                evbuffer_drain(in, 1);
            } else if (got < 2) {
                if (got == 1 && two[0] != '\r')
                    return bad(c, 400, "missing CRLF after chunk data");
                return R_MORE;
            } else if (two[0] == '\r' && two[1] == '\n') {
                evbuffer_drain(in, 2);
            } else {
                return bad(c, 400, "missing CRLF after chunk data");
            }
            c->pstate = P_CHUNK_SIZE;
            break;
        }
        case P_TRAILER:
            r = take_line(in, line, &len);
            if (r == 0)
                return R_MORE;
            c->trailer_bytes += len + 2;
            if (r < 0 || c->trailer_bytes > HEAD_MAX)
                return bad(c, 431, "trailer section too large");
            if (len == 0) {
                c->pstate = P_HEAD;
                return R_READY;
            }
            break; /* trailer fields are read and ignored */
        }
    }
}

/* Handles every complete request in the input, in order, until one needs
 * to wait (delay, slow output) or the input runs out. Never frees c. */
static void process_input(struct conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);

    while (c->state == S_IDLE) {
        int r = parse_some(c, in);
        if (r == R_MORE) {
            if (c->peer_eof)
                begin_close(c, END_FIN);
            return;
        }
        if (r == R_READY) {
            start_request(c);
            continue;
        }
        send_error(c, r);
    }
}

/* ---------------------------------------------------------------- closing */

/* Closes once the queued output has gone out. Never frees c here: the
 * close itself always runs from a top-level callback. */
static void begin_close(struct conn *c, enum end_action action)
{
    flight_end(c);
    c->tag_idx = -1;
    c->state = S_CLOSING;
    c->close_action = action;
    evtimer_del(c->timer);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        event_active(c->timer, EV_TIMEOUT, 1);
}

/* FIN: shut down the sending side and drain input for a while, so that
 * unread pipelined requests do not turn our close into an RST that could
 * destroy the response in flight. RST: SO_LINGER 0, then close. */
static void do_close(struct conn *c)
{
    evutil_socket_t fd = bufferevent_getfd(c->bev);

    if (c->close_action == END_RST) {
        struct linger lg;
        lg.l_onoff = 1;
        lg.l_linger = 0;
        (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        conn_free(c);
        return;
    }
    if (c->peer_eof) {
        conn_free(c);
        return;
    }
    {
        struct evbuffer *in = bufferevent_get_input(c->bev);

        (void)shutdown(fd, SHUT_WR);
        c->state = S_LINGER;
        evbuffer_drain(in, evbuffer_get_length(in));
        if (bufferevent_enable(c->bev, EV_READ) != 0 || !arm_timer(c, LINGER_MS))
            conn_free(c);
    }
}

/* ---------------------------------------------------------------- libevent callbacks */

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);

    switch (c->state) {
    case S_IDLE:
        process_input(c);
        break;
    case S_LINGER:
    case S_STUCK:
        evbuffer_drain(in, evbuffer_get_length(in));
        break;
    default:
        break; /* busy: input waits, bounded by the read watermark */
    }
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;

    switch (c->state) {
    case S_STREAM:
        stream_body(c);
        if (c->state == S_IDLE)
            process_input(c);
        break;
    case S_CLOSING:
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            do_close(c); /* may free c */
        break;
    default:
        break;
    }
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct conn *c = arg;

    (void)bev;
    if (what & BEV_EVENT_ERROR) {
        conn_free(c);
        return;
    }
    if (what & BEV_EVENT_EOF) {
        c->peer_eof = true;
        switch (c->state) {
        case S_LINGER:
        case S_STUCK:
            conn_free(c);
            return;
        case S_IDLE:
            /* a half-closed client still gets answers to what it sent */
            process_input(c);
            return;
        case S_DELAY:
        case S_STREAM:
        case S_CHUNK_WAIT:
            if (c->ctl.abort_on_eof) {
                logmsg("gw_stub: conn %llu req %llu: peer gone, response abandoned\n", c->id, c->nreq);
                conn_free(c);
                return;
            }
            return; /* the response in progress finishes, then we close */
        default:
            return; /* the response in progress finishes, then we close */
        }
    }
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;

    (void)fd;
    (void)what;
    switch (c->state) {
    case S_DELAY:
        send_response(c);
        break;
    case S_CHUNK_WAIT:
        c->state = S_STREAM;
        stream_body(c);
        break;
    case S_CLOSING:
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            do_close(c); /* may free c */
        return;
    case S_LINGER:
        conn_free(c);
        return;
    case S_IDLE:
        if (c->idle_send) {
            c->idle_send = false;
            logmsg("gw_stub: conn %llu: sending %zu trailing bytes while idle\n", c->id, c->idle_bytes_len);
            put(c, bufferevent_get_output(c->bev), c->idle_bytes, c->idle_bytes_len);
            if (c->oom)
                begin_close(c, END_RST);
        } else if (c->idle_close) {
            c->idle_close = false;
            logmsg("gw_stub: conn %llu: closing after close_idle_ms\n", c->id);
            begin_close(c, END_FIN);
        }
        return;
    default:
        return;
    }
    if (c->state == S_IDLE)
        process_input(c);
}

static void conn_free(struct conn *c)
{
    struct worker *w = c->w;

    if (c->in_flight)
        tag_abandoned(c);
    flight_end(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->timer)
        event_free(c->timer);
    if (c->bev)
        bufferevent_free(c->bev);
    if (c->body)
        evbuffer_free(c->body);
    if (c->prefix)
        evbuffer_free(c->prefix);
    free(c->head);
    free(c->scratch);
    free(c);
    atomic_fetch_sub(&g_conn_open, 1);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    struct worker *w = arg;
    struct conn *c;
    int one = 1;

    (void)l;
    (void)sa;
    (void)salen;
    /* small responses must not wait for delayed ACKs */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c = calloc(1, sizeof *c);
    if (!c) {
        evutil_closesocket(fd);
        return;
    }
    c->bev = bufferevent_socket_new(w->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
        evutil_closesocket(fd);
        free(c);
        return;
    }
    c->w = w;
    c->tag_idx = -1;
    {
        struct sockaddr_storage ls;
        socklen_t llen = sizeof ls;
        if (getsockname(fd, (struct sockaddr *)&ls, &llen) == 0)
            c->lport = ntohs(ls.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ls)->sin6_port
                                                      : ((struct sockaddr_in *)&ls)->sin_port);
    }
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    atomic_fetch_add(&g_conn_open, 1);
    c->id = atomic_fetch_add(&g_conn_total, 1) + 1;
    c->state = S_IDLE;
    c->pstate = P_HEAD;
    c->timer = evtimer_new(w->base, timer_cb, c);
    c->body = evbuffer_new();
    c->prefix = evbuffer_new();
    if (!c->timer || !c->body || !c->prefix || !conn_reserve(c, 4096)) {
        conn_free(c);
        return;
    }
    bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
    bufferevent_setwatermark(c->bev, EV_READ, 0, READ_HIGH);
    bufferevent_setwatermark(c->bev, EV_WRITE, OUT_LOW, 0);
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0)
        conn_free(c);
}

static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    int err = EVUTIL_SOCKET_ERROR();

    (void)l;
    (void)arg;
    logmsg("gw_stub: accept: %s\n", evutil_socket_error_to_string(err));
}

static void wake_cb(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;

    (void)fd;
    (void)what;
    event_base_loopbreak(w->base);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;

    event_base_dispatch(w->base);
    return NULL;
}

/* ---------------------------------------------------------------- startup */

static void usage(FILE *f)
{
    fprintf(f, "usage: gw_stub [-l ADDR:PORT]... [-t THREADS] [-p PORTFILE] [-q]\n"
               "  -l ADDR:PORT  listen address (repeatable; default " DEFAULT_ADDR
               "; IPv6 as [::1]:9102; port 0 = any)\n"
               "  -t THREADS    worker threads, each with its own SO_REUSEPORT listener (default 1)\n"
               "  -p PORTFILE   write the bound port(s), one per line, once listening\n"
               "  -q            quiet: no per-request log lines on stderr\n");
}

/* ADDR:PORT, [V6ADDR]:PORT, :PORT (all interfaces) or PORT (127.0.0.1). */
static bool parse_addr(const char *s, struct laddr *a)
{
    char host[256];
    const char *port;
    struct addrinfo hints, *res = NULL;
    long long pv;
    size_t hl;

    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':')
            return false;
        hl = (size_t)(rb - s - 1);
        if (hl == 0 || hl >= sizeof host)
            return false;
        memcpy(host, s + 1, hl);
        host[hl] = '\0';
        port = rb + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            memcpy(host, "127.0.0.1", sizeof "127.0.0.1");
            port = s;
        } else {
            hl = (size_t)(colon - s);
            if (hl >= sizeof host)
                return false;
            if (hl == 0) {
                memcpy(host, "0.0.0.0", sizeof "0.0.0.0");
            } else {
                memcpy(host, s, hl);
                host[hl] = '\0';
            }
            port = colon + 1;
        }
    }
    if (!parse_ll(port, strlen(port), 0, 65535, &pv))
        return false;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    if (getaddrinfo(host, port, &hints, &res) != 0 || !res)
        return false;
    if (res->ai_addrlen > sizeof a->ss) {
        freeaddrinfo(res);
        return false;
    }
    memset(a, 0, sizeof *a);
    memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
    a->len = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return true;
}

static int addr_port(const struct laddr *a)
{
    if (a->ss.ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)(const void *)&a->ss)->sin6_port);
    return ntohs(((const struct sockaddr_in *)(const void *)&a->ss)->sin_port);
}

static void addr_format(struct laddr *a)
{
    char ip[INET6_ADDRSTRLEN];
    const void *src;

    if (a->ss.ss_family == AF_INET6)
        src = &((const struct sockaddr_in6 *)(const void *)&a->ss)->sin6_addr;
    else
        src = &((const struct sockaddr_in *)(const void *)&a->ss)->sin_addr;
    if (!inet_ntop(a->ss.ss_family, src, ip, sizeof ip))
        memcpy(ip, "?", 2);
    snprintf(a->text, sizeof a->text, a->ss.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d", ip, addr_port(a));
}

/* A bound, listening, non-blocking socket; -1 on error (reported). */
static int open_listener(struct laddr *a, bool reuseport)
{
    int one = 1;
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0) {
        fprintf(stderr, "gw_stub: socket: %s\n", strerror(errno));
        return -1;
    }
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* only with several threads: otherwise two stubs on one port must fail */
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
        fprintf(stderr, "gw_stub: SO_REUSEPORT: %s\n", strerror(errno));
        close(fd);
        return -1;
    }
    if (a->ss.ss_family == AF_INET6)
        (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a->ss, a->len) != 0 || listen(fd, SOMAXCONN) != 0) {
        addr_format(a);
        fprintf(stderr, "gw_stub: cannot listen on %s: %s\n", a->text, strerror(errno));
        close(fd);
        return -1;
    }
    if (addr_port(a) == 0) {
        /* port 0: learn the real one; the other threads bind to it */
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
            fprintf(stderr, "gw_stub: getsockname: %s\n", strerror(errno));
            close(fd);
            return -1;
        }
        memcpy(&a->ss, &ss, len);
        a->len = len;
    }
    return fd;
}

/* Written to a temporary name and renamed, so a reader never sees half. */
static bool write_portfile(const char *path, const struct laddr *addrs, int n)
{
    char tmp[4096];
    FILE *f;
    int i, len;
    bool ok = true;

    len = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (len < 0 || (size_t)len >= sizeof tmp)
        return false;
    f = fopen(tmp, "w");
    if (!f)
        return false;
    for (i = 0; i < n; i++)
        if (fprintf(f, "%d\n", addr_port(&addrs[i])) < 0)
            ok = false;
    if (fclose(f) != 0)
        ok = false;
    if (ok && rename(tmp, path) != 0)
        ok = false;
    if (!ok)
        (void)unlink(tmp);
    return ok;
}

static void worker_destroy(struct worker *w)
{
    int i;

    while (w->conns)
        conn_free(w->conns);
    for (i = 0; i < w->nlis; i++)
        evconnlistener_free(w->lis[i]);
    if (w->wake_ev)
        event_free(w->wake_ev);
    if (w->wake[0] >= 0)
        close(w->wake[0]);
    if (w->wake[1] >= 0)
        close(w->wake[1]);
    /* also runs the finalizers of bufferevents freed above */
    if (w->base)
        event_base_free(w->base);
}

int main(int argc, char **argv)
{
    struct laddr addrs[MAX_LISTEN];
    struct worker *workers = NULL;
    const char *portfile = NULL;
    long long nthreads = 1;
    int naddr = 0, opt, i, j, sig = 0, rc = 1;
    sigset_t sigs;

    /* SIGTERM/SIGINT are taken by sigwait() in the main thread; every
     * worker inherits the blocked mask */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    while ((opt = getopt(argc, argv, "l:t:p:qh")) != -1) {
        switch (opt) {
        case 'l':
            if (naddr == MAX_LISTEN) {
                fprintf(stderr, "gw_stub: at most %d -l options\n", MAX_LISTEN);
                return 2;
            }
            if (!parse_addr(optarg, &addrs[naddr])) {
                fprintf(stderr, "gw_stub: bad listen address '%s'\n", optarg);
                return 2;
            }
            naddr++;
            break;
        case 't':
            if (!parse_ll(optarg, strlen(optarg), 1, MAX_THREADS, &nthreads)) {
                fprintf(stderr, "gw_stub: -t wants 1..%d\n", MAX_THREADS);
                return 2;
            }
            break;
        case 'p': portfile = optarg; break;
        case 'q': g_quiet = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (naddr == 0) {
        if (!parse_addr(DEFAULT_ADDR, &addrs[0])) {
            fprintf(stderr, "gw_stub: cannot resolve %s\n", DEFAULT_ADDR);
            return 1;
        }
        naddr = 1;
    }
    memset(g_pad, 'x', sizeof g_pad);

    workers = calloc((size_t)nthreads, sizeof *workers);
    if (!workers) {
        fprintf(stderr, "gw_stub: out of memory\n");
        return 1;
    }
    for (i = 0; i < nthreads; i++)
        workers[i].wake[0] = workers[i].wake[1] = -1;
    for (i = 0; i < nthreads; i++) {
        struct worker *w = &workers[i];
        w->idx = i;
        /* Precise timers: libevent's default clock on Linux is
         * CLOCK_MONOTONIC_COARSE (a tick, up to 4 ms, behind received_ms). */
        struct event_config *ec = event_config_new();
        if (ec)
            event_config_set_flag(ec, EVENT_BASE_FLAG_PRECISE_TIMER);
        w->base = ec ? event_base_new_with_config(ec) : NULL;
        if (ec)
            event_config_free(ec);
        if (!w->base || pipe2(w->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
            fprintf(stderr, "gw_stub: cannot set up worker %d\n", i);
            goto out;
        }
        w->wake_ev = event_new(w->base, w->wake[0], EV_READ, wake_cb, w);
        if (!w->wake_ev || event_add(w->wake_ev, NULL) != 0) {
            fprintf(stderr, "gw_stub: cannot set up worker %d\n", i);
            goto out;
        }
    }
    for (j = 0; j < naddr; j++) {
        for (i = 0; i < nthreads; i++) {
            struct worker *w = &workers[i];
            int fd = open_listener(&addrs[j], nthreads > 1);
            if (fd < 0)
                goto out;
            w->lis[w->nlis] = evconnlistener_new(w->base, accept_cb, w, LEV_OPT_CLOSE_ON_FREE, 0, fd);
            if (!w->lis[w->nlis]) {
                fprintf(stderr, "gw_stub: evconnlistener_new failed\n");
                close(fd);
                goto out;
            }
            evconnlistener_set_error_cb(w->lis[w->nlis], accept_error_cb);
            w->nlis++;
        }
        addr_format(&addrs[j]);
    }
    if (portfile && !write_portfile(portfile, addrs, naddr)) {
        fprintf(stderr, "gw_stub: cannot write port file %s: %s\n", portfile, strerror(errno));
        goto out;
    }
    for (i = 0; i < nthreads; i++) {
        if (pthread_create(&workers[i].tid, NULL, worker_main, &workers[i]) != 0) {
            fprintf(stderr, "gw_stub: cannot start thread %d\n", i);
            goto stop;
        }
        workers[i].started = true;
    }
    for (j = 0; j < naddr; j++)
        printf("gw_stub listening on %s\n", addrs[j].text);
    fflush(stdout);

    while (sigwait(&sigs, &sig) != 0)
        ;
    rc = 0;
stop:
    for (i = 0; i < nthreads; i++) {
        if (!workers[i].started)
            continue;
        /* each loop breaks itself: its base is only touched by its thread */
        while (write(workers[i].wake[1], "x", 1) < 0 && errno == EINTR)
            ;
        pthread_join(workers[i].tid, NULL);
    }
out:
    for (i = 0; i < nthreads; i++)
        worker_destroy(&workers[i]);
    free(workers);
    for (i = 0; i < g_nkeys; i++)
        free(g_keys[i].text);
    return rc;
}
