/* Unit tests for src/gw_http.c: the request parser, fed whole and one byte
 * at a time, on valid, limit-breaking and smuggling-shaped requests. */
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
          T(test_accepted_forms), T(test_mutations_do_not_crash))
