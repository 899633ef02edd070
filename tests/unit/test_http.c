/* Unit tests for src/gw_http.c: the request parser, fed whole and one byte
 * at a time, on valid, limit-breaking and smuggling-shaped requests. */
#include "gw_budget.h"
#include "gw_http.h"
#include "gw_test.h"

#include <event2/buffer.h>
#include <stdlib.h>

static gw_http_limits_t limits = {
    .max_header_bytes = 1024, .max_headers = 10, .max_url_bytes = 256, .max_body_bytes = 64,
};

typedef struct {
    gw_parse_result_t res;
    int status;
    size_t consumed;
} outcome_t;

/* Feeds text in pieces of step bytes (0: all at once) until a request is
 * complete or rejected. */
static outcome_t
feed(gw_parser_t *p, const char *text, size_t len, size_t step)
{
    outcome_t o = { GW_PARSE_AGAIN, 0, 0 };
    size_t off = 0;
    while (off < len) {
        size_t n = step ? GW_MIN(step, len - off) : len - off;
        size_t used = 0;
        o.res = gw_parser_execute(p, text + off, n, &used);
        off += used;
        o.consumed = off;
        if (o.res == GW_PARSE_HEADERS) {
            if (gw_parser_resume(p) != GW_OK) {
                o.res = GW_PARSE_ERROR; /* the declared length is over the limit */
                break;
            }
            continue;
        }
        if (o.res != GW_PARSE_AGAIN)
            break;
    }
    o.status = p->status;
    return o;
}

/* Parses one request both ways and checks they agree. */
static outcome_t
parse_both(const char *text, gw_req_t *out_req, gw_parser_t *out_p)
{
    gw_parser_t p1, p2;
    gw_req_t r1, r2;
    gw_parser_init(&p1, &r1, &limits);
    gw_parser_init(&p2, &r2, &limits);
    outcome_t a = feed(&p1, text, strlen(text), 0);
    outcome_t b = feed(&p2, text, strlen(text), 1);
    if (a.res != b.res || a.status != b.status)
        printf("    whole vs bytewise differ: %d/%d vs %d/%d for %s\n", a.res, a.status, b.res, b.status, text);
    CHECK(a.res == b.res && a.status == b.status);
    gw_parser_free(&p2);
    *out_p = p1;
    *out_req = r1;
    out_p->req = out_req;
    out_p->ll.data = out_p;
    return a;
}

static void
expect_status(const char *text, int status)
{
    gw_parser_t p;
    gw_req_t r;
    outcome_t o = parse_both(text, &r, &p);
    if (o.res != GW_PARSE_ERROR || o.status != status)
        printf("    expected %d, got result %d status %d for: %s\n", status, o.res, o.status, text);
    CHECK(o.res == GW_PARSE_ERROR && o.status == status);
    gw_parser_free(&p);
}

static void
expect_ok(const char *text)
{
    gw_parser_t p;
    gw_req_t r;
    outcome_t o = parse_both(text, &r, &p);
    if (o.res != GW_PARSE_DONE)
        printf("    expected a request, got result %d status %d (%s) for: %s\n", o.res, o.status,
               p.reason ? p.reason : "", text);
    CHECK(o.res == GW_PARSE_DONE);
    gw_parser_free(&p);
}

static void
test_simple_get(void)
{
    gw_parser_t p;
    gw_req_t r;
    outcome_t o = parse_both("GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\nX-T:  v  \r\n\r\n",
                             &r, &p);
    CHECK(o.res == GW_PARSE_DONE);
    CHECK(r.method == HTTP_GET && r.http_minor == 1 && r.keep_alive);
    CHECK(r.path_len == 4 && memcmp(r.hbuf + r.path_off, "/a/b", 4) == 0);
    CHECK(r.query_len == 7 && memcmp(r.hbuf + r.query_off, "x=1&y=2", 7) == 0);
    CHECK(r.path.nseg == 2);
    CHECK_STR(r.request_id, "abc-123");
    size_t len;
    const char *v = gw_req_header(&r, "x-t", &len);
    CHECK(v != NULL && len == 1 && v[0] == 'v'); /* surrounding whitespace trimmed */
    CHECK(gw_req_header(&r, "missing", &len) == NULL);
    gw_parser_free(&p);
}

static void
test_request_id_generated_when_insane(void)
{
    gw_parser_t p;
    gw_req_t r;
    parse_both("GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: a b\r\n\r\n", &r, &p);
    CHECK(strlen(r.request_id) == 32 && strchr(r.request_id, ' ') == NULL);
    gw_parser_free(&p);
}

static void
test_bodies(void)
{
    gw_parser_t p;
    gw_req_t r;
    outcome_t o = parse_both("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", &r, &p);
    CHECK(o.res == GW_PARSE_DONE && r.body_len == 5 && evbuffer_get_length(r.body) == 5);
    gw_parser_free(&p);
    o = parse_both("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
                   &r, &p);
    CHECK(o.res == GW_PARSE_DONE && r.body_len == 5);
    char body[8] = { 0 };
    evbuffer_copyout(r.body, body, 5);
    CHECK_STR(body, "abcde");
    gw_parser_free(&p);
}

static void
test_trailers_are_not_headers(void)
{
    gw_parser_t p;
    gw_req_t r;
    outcome_t o = parse_both("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nHost: evil\r\n\r\n",
                             &r, &p);
    CHECK(o.res == GW_PARSE_DONE && r.body_len == 3);
    size_t len;
    CHECK(gw_req_header(&r, "x-forwarded-for", &len) == NULL);
    const char *host = gw_req_header(&r, "host", &len);
    CHECK(host != NULL && len == 1 && host[0] == 'h');
    CHECK(r.nheaders == 2);
    gw_parser_free(&p);
    char big[2048];
    snprintf(big, sizeof(big),
             "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: %01100d\r\n\r\n", 0);
    expect_status(big, 431);
}

static void
test_pipelined_and_next(void)
{
    const char *two = "GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.0\r\n\r\n";
    const size_t first = strlen("GET /1 HTTP/1.1\r\nHost: h\r\n\r\n");
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    outcome_t o = feed(&p, two, strlen(two), 0);
    CHECK(o.res == GW_PARSE_DONE && o.consumed == first);
    CHECK(r.hbuf[r.path_off + 1] == '1');
    gw_parser_next(&p);
    o = feed(&p, two + first, strlen(two) - first, 0);
    CHECK(o.res == GW_PARSE_DONE);
    CHECK(r.hbuf[r.path_off + 1] == '2' && r.http_minor == 0 && !r.keep_alive);
    gw_parser_free(&p);
}

static void
test_expect_continue(void)
{
    const char *t = "PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok";
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    size_t used;
    CHECK(gw_parser_execute(&p, t, strlen(t), &used) == GW_PARSE_HEADERS);
    CHECK(r.expect_continue && used == strlen(t) - 2);
    gw_parser_resume(&p);
    CHECK(gw_parser_execute(&p, t + used, 2, &used) == GW_PARSE_DONE);
    gw_parser_free(&p);
    expect_status("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: something\r\nContent-Length: 2\r\n\r\nok", 417);
}

static void
test_keep_alive_rules(void)
{
    gw_parser_t p;
    gw_req_t r;
    parse_both("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &r, &p);
    CHECK(r.keep_alive);
    gw_parser_free(&p);
    parse_both("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", &r, &p);
    CHECK(!r.keep_alive);
    gw_parser_free(&p);
}

static void
test_limits(void)
{
    char big[2048];
    snprintf(big, sizeof(big), "GET /%0300d HTTP/1.1\r\nHost: h\r\n\r\n", 0);
    expect_status(big, 414);
    snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nHost: h\r\nX: %01100d\r\n\r\n", 0);
    expect_status(big, 431);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\nG: 1\r\nH: 1\r\n"
                  "I: 1\r\nJ: 1\r\n\r\n",
                  431);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 65\r\n\r\n", 413);
    snprintf(big, sizeof(big), "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n%065d\r\n0\r\n\r\n",
             0);
    expect_status(big, 413);
}

static void
test_smuggling_vectors(void)
{
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\n0\n\n", 400);
    /* obsolete line folding */
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", 400);
    /* bare LF, anywhere in the head */
    expect_status("GET / HTTP/1.1\nHost: h\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\nX: 1\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\n\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400);
    /* invalid characters */
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX: a\001b\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX: a\177b\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX Y: a\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\nX : a\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: h\r\n: a\r\n\r\n", 400);
    expect_status("GET /a\001 HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    /* Host rules and versions */
    expect_status("GET / HTTP/1.1\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400);
    expect_status("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505);
    expect_status("GET /\r\n\r\n", 400);
    expect_status("GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    expect_status("GET /.. HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    expect_status("CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", 405);
}

static void
test_accepted_forms(void)
{
    expect_ok("GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n\r\n");
    expect_ok("GET / HTTP/1.0\r\n\r\n"); /* Host is optional in 1.0 */
    expect_ok("\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"); /* a stray empty line before the request */
    expect_ok("GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n");
    expect_ok("GET / HTTP/1.1\r\nHost: h\r\nX-Utf8: caf\xc3\xa9\r\n\r\n");
    expect_ok("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
}

/* Feeds the head of text; at GW_PARSE_HEADERS sets limit and mode, resumes,
 * and feeds the rest (step bytes at a time, 0: at once). */
static outcome_t
feed_with(gw_parser_t *p, const char *text, size_t len, size_t limit, gw_body_mode_t mode, size_t step)
{
    outcome_t o = { GW_PARSE_AGAIN, 0, 0 };
    size_t off = 0;
    while (off < len) {
        size_t n = step ? GW_MIN(step, len - off) : len - off;
        size_t used = 0;
        o.res = gw_parser_execute(p, text + off, n, &used);
        off += used;
        o.consumed = off;
        if (o.res == GW_PARSE_HEADERS) {
            gw_parser_set_body_limit(p, limit);
            gw_parser_set_body_mode(p, mode);
            if (gw_parser_resume(p) != GW_OK) {
                o.res = GW_PARSE_ERROR;
                break;
            }
            continue;
        }
        if (o.res != GW_PARSE_AGAIN)
            break;
    }
    o.status = p->status;
    return o;
}

/* Content-Length across the whole 64-bit range: over the limit is 413, a
 * length that does not fit int64_t is 400 (it used to turn negative and
 * skip the limit), whatever the limit is. */
static void
test_content_length_range(void)
{
    static const struct {
        const char *cl;
        size_t limit;
        int status; /* 0: accepted */
    } cases[] = {
        { "0", 64, 0 },
        { "64", 64, 0 },
        { "65", 64, 413 },
        { "0064", 64, 0 },
        { "9223372036854775807", 64, 413 },
        { "9223372036854775807", SIZE_MAX, 0 },
        { "9223372036854775808", 64, 400 },
        { "9223372036854775808", SIZE_MAX, 400 },
        { "9223372036854775809", SIZE_MAX, 400 },
        { "12345678901234567890", SIZE_MAX, 400 },
        { "18446744073709551615", SIZE_MAX, 400 },
        { "18446744073709551616", SIZE_MAX, 400 },
        { "99999999999999999999999", SIZE_MAX, 400 },
        { "-1", SIZE_MAX, 400 },
        { "+1", SIZE_MAX, 400 },
        { "0x10", SIZE_MAX, 400 },
        { "1 1", SIZE_MAX, 400 },
        { "", SIZE_MAX, 400 },
    };
    for (size_t i = 0; i < GW_NELEM(cases); i++) {
        char text[256];
        snprintf(text, sizeof(text), "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %s\r\n\r\n", cases[i].cl);
        for (size_t step = 0; step <= 1; step++) {
            gw_parser_t p;
            gw_req_t r;
            gw_parser_init(&p, &r, &limits);
            outcome_t o = feed_with(&p, text, strlen(text), cases[i].limit, GW_BODY_STREAM, step);
            bool ok = cases[i].status ? o.res == GW_PARSE_ERROR && o.status == cases[i].status
                                      : o.res != GW_PARSE_ERROR && r.content_length >= 0;
            if (!ok)
                printf("    Content-Length %s, limit %zu: result %d status %d (%s), want %d\n", cases[i].cl,
                       cases[i].limit, o.res, o.status, p.reason ? p.reason : "", cases[i].status);
            CHECK(ok);
            gw_parser_free(&p);
        }
    }
}

/* Chunked framing that llhttp alone lets through, and chunk sizes past the
 * limit, which are refused before any of their data is read. */
static void
test_chunked_strict(void)
{
#define CH "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    static const struct {
        const char *body;
        int status;  /* 0: accepted */
        size_t kept; /* body bytes read before a 413 */
    } cases[] = {
        { "5\r\nhello\r\n0\r\n\r\n", 0 , 0 },
        { "5;a=b\r\nhello\r\n0\r\n\r\n", 0 , 0 },
        { "5;a=\"b c\"\r\nhello\r\n0\r\n\r\n", 0 , 0 },
        { "00000000000000000000000000000005\r\nhello\r\n0\r\n\r\n", 0 , 0 },
        { "000000000000000000000000000000005\r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", 0 , 0 },
        { "5\rXhello\r\n0\r\n\r\n", 400 , 0 },       /* llhttp 8 takes any byte after the CR */
        { "5;a\rXhello\r\n0\r\n\r\n", 400 , 0 },
        { "5\r\nhello\rX0\r\n\r\n", 400 , 0 },
        { "5\r\nhello\r\n0\rX\r\n", 400 , 0 },
        { "5\r\nhello\r\n0\r\n\rX", 400 , 0 },
        { "5\r\nhello\r\n0\r\n\n", 400 , 0 },         /* a bare LF ends it for llhttp */
        { "5\r\nhello\r\n0\r\nX: 1\r\n y\r\n\r\n", 400 , 0 }, /* obs-fold in a trailer */
        { "5\r\nhello\r\n0\r\nX: 1\n\r\n", 400 , 0 },
        { "5\nhello\n0\n\n", 400 , 0 },
        { "5;a\x01\r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "5;a\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "40\r\n", 0 , 0 },                           /* 64 bytes: at the limit, waits for them */
        { "41\r\n", 413 , 0 },                         /* over it: refused before a byte of data */
        { "40\r\n", 0 , 0 },
        { "20\r\n01234567890123456789012345678901\r\n21\r\n", 413, 32 },
        { "ffffffffffffffff\r\n", 413 , 0 },
        { "ffffffffffffffff;x\r\n", 413 , 0 },
        { "10000000000000000\r\n", 400 , 0 },          /* 2^64: cannot be represented */
        { "fffffffffffffffff1\r\n", 400 , 0 },
        { "zz\r\n", 400 , 0 },
        { " 5\r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "5 \r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "+5\r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "0x5\r\nhello\r\n0\r\n\r\n", 400 , 0 },
        { "\r\n", 400 , 0 },
    };
    for (size_t i = 0; i < GW_NELEM(cases); i++) {
        char text[512];
        snprintf(text, sizeof(text), CH "%s", cases[i].body);
        for (size_t step = 0; step <= 1; step++) {
            gw_parser_t p;
            gw_req_t r;
            gw_parser_init(&p, &r, &limits);
            outcome_t o = feed_with(&p, text, strlen(text), 64, GW_BODY_KEEP, step);
            bool ok = cases[i].status ? o.res == GW_PARSE_ERROR && o.status == cases[i].status
                                      : o.res != GW_PARSE_ERROR;
            if (cases[i].status == 413)
                ok = ok && r.body_len <= cases[i].kept; /* not one byte of the too large chunk was read */
            if (!ok)
                printf("    chunked %d: result %d status %d (%s), body %zu, want %d: %s\n", (int)i, o.res, o.status,
                       p.reason ? p.reason : "", r.body_len, cases[i].status, cases[i].body);
            CHECK(ok);
            gw_parser_free(&p);
        }
    }
    /* extensions are bounded by max_header_bytes (1024 here) per request */
    char big[4096];
    int n = snprintf(big, sizeof(big), CH "1;%0600d\r\nx\r\n1;%0600d\r\ny\r\n0\r\n\r\n", 0, 0);
    CHECK(n > 0 && (size_t)n < sizeof(big));
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    outcome_t o = feed_with(&p, big, strlen(big), 64, GW_BODY_KEEP, 0);
    CHECK(o.res == GW_PARSE_ERROR && o.status == 413);
    gw_parser_free(&p);
    /* the pipelined request after a chunked body is not part of it */
    const char *two = CH "1\r\nx\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n";
    gw_parser_init(&p, &r, &limits);
    o = feed_with(&p, two, strlen(two), 64, GW_BODY_KEEP, 0);
    CHECK(o.res == GW_PARSE_DONE && o.consumed == strlen(two) - strlen("GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"));
    gw_parser_free(&p);
#undef CH
}

static void
test_host_rules(void)
{
    static const char *const good[] = { "h", "example.com", "example.com.", "a-b_c~d.e", "1.2.3.4", "1.2.3.4:80",
                                        "h:0", "h:65535", "h:00080", "[::1]", "[::1]:8080", "[2001:db8::1]",
                                        "[::ffff:1.2.3.4]:1", "%41bc", "a!$&'()*+,;=b", "xn--bcher-kva.example" };
    static const char *const bad[] = { "", "a b", "evil.com/../x", "a/b", "a\\b", "a@b", "user@h", "h:", "h:65536",
                                       "h:123456", "h:-1", "h:8a", "h::80", "[::1", "::1", "[::1]x", "[]",
                                       "[nothost]", "[::1]:", "%4", "%zz", "a\"b", "a<b", "a#b", "a?b",
                                       "[fe80::1%25eth0]", ":80", "a\tb" };
    for (size_t i = 0; i < GW_NELEM(good); i++) {
        if (!gw_http_host_valid(good[i], strlen(good[i])))
            printf("    a valid host refused: \"%s\"\n", good[i]);
        CHECK(gw_http_host_valid(good[i], strlen(good[i])));
    }
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        if (gw_http_host_valid(bad[i], strlen(bad[i])))
            printf("    an invalid host accepted: \"%s\"\n", bad[i]);
        CHECK(!gw_http_host_valid(bad[i], strlen(bad[i])));
        char text[256];
        snprintf(text, sizeof(text), "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", bad[i]);
        if (strchr(bad[i], '\t') == NULL && bad[i][0] != '\0') /* (those are trimmed by llhttp) */
            expect_status(text, 400);
        if (strpbrk(bad[i], "/?#") != NULL)
            continue; /* in a target those end the authority: "http://a/b/x" is host a */
        snprintf(text, sizeof(text), "GET http://%s/x HTTP/1.1\r\nHost: h\r\n\r\n", bad[i]);
        expect_status(text, 400);
    }
    expect_status("GET / HTTP/1.1\r\nHost:\r\n\r\n", 400);
    expect_status("GET / HTTP/1.0\r\nHost: a b\r\n\r\n", 400);
    expect_status("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400);
    /* the request's host: the absolute-form authority wins over Host */
    gw_parser_t p;
    gw_req_t r;
    parse_both("GET http://a.example:81/x HTTP/1.1\r\nHost: b.example\r\n\r\n", &r, &p);
    size_t len;
    const char *h = gw_req_host(&r, &len);
    CHECK(h != NULL && len == 12 && memcmp(h, "a.example:81", 12) == 0);
    CHECK(r.path_len == 2 && memcmp(r.hbuf + r.path_off, "/x", 2) == 0);
    gw_parser_free(&p);
    parse_both("GET /x HTTP/1.1\r\nHost: b.example \r\n\r\n", &r, &p);
    h = gw_req_host(&r, &len);
    CHECK(h != NULL && len == 9 && memcmp(h, "b.example", 9) == 0);
    gw_parser_free(&p);
    parse_both("GET /x HTTP/1.0\r\n\r\n", &r, &p);
    CHECK(gw_req_host(&r, &len) == NULL);
    gw_parser_free(&p);
}

/* Transfer-Encoding that frames nothing, or in HTTP/1.0; control bytes in
 * the target. */
static void
test_framing_odds(void)
{
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n", 400);
    expect_status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400);
    expect_status("POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\nx", 400);
    expect_status("GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    expect_status("GET /a?\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    /* the request line is three parts with one space between (llhttp takes more) */
    expect_status("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    expect_status("GET /  HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    expect_status("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400);
    expect_status(" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    expect_status("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    expect_ok("\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n");
    /* trailer names are tokens too */
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX Y: 1\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n: 1\r\n\r\n", 400);
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\x01\r\n\r\n", 400);
    expect_ok("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a b\r\n\r\n");
    /* gatherd decodes chunked only: other codings are 501 */
    expect_status("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501);
    expect_ok("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n");
}

/* Kept bodies are taken from gw_budget_bodies and given back once;
 * discarded bodies are limited but never stored. */
static void
test_body_modes_and_budget(void)
{
    gw_budget_set_limit(&gw_budget_bodies, 10);
    gw_parser_t p;
    gw_req_t r;
    /* a declared length is taken at once */
    const char *cl = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n12345678";
    gw_parser_init(&p, &r, &limits);
    outcome_t o = feed_with(&p, cl, strlen(cl), 64, GW_BODY_KEEP, 0);
    CHECK(o.res == GW_PARSE_DONE && gw_budget_used(&gw_budget_bodies) == 8);
    /* a second one does not fit: 503 before its body is read */
    gw_parser_t p2;
    gw_req_t r2;
    gw_parser_init(&p2, &r2, &limits);
    uint64_t refused = gw_budget_refused(&gw_budget_bodies);
    o = feed_with(&p2, cl, strlen(cl), 64, GW_BODY_KEEP, 0);
    CHECK(o.res == GW_PARSE_ERROR && o.status == 503 && r2.body_len == 0);
    CHECK(gw_budget_refused(&gw_budget_bodies) == refused + 1 && gw_budget_used(&gw_budget_bodies) == 8);
    gw_parser_free(&p2);
    /* ... but a discarded or streamed one does not need the budget */
    gw_parser_init(&p2, &r2, &limits);
    o = feed_with(&p2, cl, strlen(cl), 64, GW_BODY_DISCARD, 1);
    CHECK(o.res == GW_PARSE_DONE && r2.body_len == 8 && evbuffer_get_length(r2.body) == 0);
    CHECK(gw_budget_used(&gw_budget_bodies) == 8);
    gw_parser_next(&p2);
    o = feed_with(&p2, cl, strlen(cl), 64, GW_BODY_STREAM, 0);
    CHECK(o.res == GW_PARSE_DONE && evbuffer_get_length(r2.body) == 8 && gw_budget_used(&gw_budget_bodies) == 8);
    gw_parser_free(&p2);
    /* the first request ends: given back once, even when released twice */
    gw_parser_body_release(&p);
    gw_parser_body_release(&p);
    CHECK(gw_budget_used(&gw_budget_bodies) == 0 && evbuffer_get_length(r.body) == 0);
    gw_parser_next(&p);
    CHECK(gw_budget_used(&gw_budget_bodies) == 0);
    /* a chunked body is taken as it arrives: 503 when it passes the budget */
    const char *ch = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n";
    o = feed_with(&p, ch, strlen(ch), 64, GW_BODY_KEEP, 1);
    CHECK(o.res == GW_PARSE_ERROR && o.status == 503);
    CHECK(gw_budget_used(&gw_budget_bodies) <= 10);
    gw_parser_free(&p); /* gives back what it held */
    CHECK(gw_budget_used(&gw_budget_bodies) == 0);
    /* a discarded body still has its limit */
    const char *big = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n30\r\n"
                      "000000000000000000000000000000000000000000000000\r\n"
                      "30\r\n000000000000000000000000000000000000000000000000\r\n0\r\n\r\n";
    gw_parser_init(&p, &r, &limits);
    o = feed_with(&p, big, strlen(big), 64, GW_BODY_DISCARD, 0);
    CHECK(o.res == GW_PARSE_ERROR && o.status == 413);
    gw_parser_free(&p);
    CHECK(gw_budget_used(&gw_budget_bodies) == 0);
    gw_budget_set_limit(&gw_budget_bodies, 256u << 20);
}

/* Random mutations of valid requests: the parser must return a definite
 * answer for each and never read out of bounds (run under ASan). */
static void
test_mutations_do_not_crash(void)
{
    static const char *const seeds[] = {
        "GET /a/b?c=d HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\n",
        "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody",
        "PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
    };
    unsigned seed = 12345;
    int done = 0, errors = 0;
    for (int i = 0; i < 20000; i++) {
        char buf[256];
        const char *s = seeds[i % GW_NELEM(seeds)];
        size_t len = strlen(s);
        memcpy(buf, s, len);
        int muts = 1 + (int)((seed = seed * 1103515245 + 12345) >> 16) % 4;
        for (int k = 0; k < muts; k++) {
            seed = seed * 1103515245 + 12345;
            size_t pos = (seed >> 16) % len;
            seed = seed * 1103515245 + 12345;
            buf[pos] = (char)((seed >> 16) & 0xff);
        }
        gw_parser_t p;
        gw_req_t r;
        gw_parser_init(&p, &r, &limits);
        outcome_t o = feed(&p, buf, len, (size_t)(i % 3 == 0 ? 1 : 0));
        if (o.res == GW_PARSE_DONE)
            done++;
        else if (o.res == GW_PARSE_ERROR) {
            errors++;
            CHECK(o.status >= 400 && o.status <= 505 && p.reason != NULL);
        }
        gw_parser_free(&p);
    }
    CHECK(done > 0 && errors > 0);
}

TEST_MAIN(T(test_simple_get), T(test_request_id_generated_when_insane), T(test_bodies), T(test_trailers_are_not_headers), T(test_pipelined_and_next),
          T(test_expect_continue), T(test_keep_alive_rules), T(test_limits), T(test_smuggling_vectors),
          T(test_accepted_forms), T(test_content_length_range), T(test_chunked_strict), T(test_host_rules),
          T(test_framing_odds), T(test_body_modes_and_budget), T(test_mutations_do_not_crash))
