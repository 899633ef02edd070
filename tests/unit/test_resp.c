/* Unit tests for src/gw_resp.c: backend responses read at once and byte by
 * byte must give the same verdict, status and body. */
#include "gw_resp.h"
#include "gw_test.h"

#include <stdlib.h>

typedef struct {
    int heads;
    int status;
    char body[256];
    size_t blen;
} seen_t;

static int
on_head(gw_resp_t *r)
{
    seen_t *s = r->arg;
    s->heads++;
    s->status = r->status;
    return GW_OK;
}

static int
on_body(gw_resp_t *r, const char *at, size_t len)
{
    seen_t *s = r->arg;
    if (s->blen + len <= sizeof(s->body)) {
        memcpy(s->body + s->blen, at, len);
        s->blen += len;
    }
    return GW_OK;
}

static const gw_resp_ops_t ops = { .head = on_head, .body = on_body };

/* Reads text in pieces of piece bytes (0: at once), then the EOF when eof;
 * returns the result, with what was seen in *s and the error in *err. */
static gw_resp_result_t
read_text(const char *text, size_t piece, uint64_t max_body, bool eof, seen_t *s, gw_resp_error_t *err)
{
    gw_resp_t r;
    memset(s, 0, sizeof(*s));
    gw_resp_init(&r, &ops, s, max_body, false);
    size_t len = strlen(text), off = 0;
    gw_resp_result_t res = GW_RESP_MORE;
    while (off < len && res == GW_RESP_MORE) {
        size_t n = piece && piece < len - off ? piece : len - off, used = 0;
        res = gw_resp_execute(&r, text + off, n, &used);
        off += used;
    }
    if (res == GW_RESP_MORE && eof)
        res = gw_resp_eof(&r);
    *err = r.error;
    return res;
}

/* text must end as expect (with status and body when DONE), read at once
 * and byte by byte. */
static void
check_resp(const char *text, uint64_t max_body, bool eof, gw_resp_result_t expect, gw_resp_error_t error, int status,
           const char *body)
{
    for (size_t piece = 0; piece <= 1; piece++) {
        seen_t s;
        gw_resp_error_t err;
        gw_resp_result_t res = read_text(text, piece, max_body, eof, &s, &err);
        if (res != expect || err != error) {
            printf("    %.60s... (pieces of %zu): result %d error %d, expected %d %d\n", text, piece, res, err, expect,
                   error);
            gw_test_failed_checks++;
            continue;
        }
        if (expect == GW_RESP_DONE) {
            CHECK(s.heads == 1 && s.status == status);
            CHECK(s.blen == strlen(body) && memcmp(s.body, body, s.blen) == 0);
        }
    }
}

#define CH "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
#define MAX ((uint64_t)INT64_MAX)

static void
test_valid(void)
{
    check_resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", MAX, false, GW_RESP_DONE, GW_RESP_OK, 200, "hello");
    check_resp(CH "5;a;b=\"x\";c=d\r\nhello\r\n0;z\r\nX-T: 1\r\n\r\n", MAX, false, GW_RESP_DONE, GW_RESP_OK, 200,
               "hello");
    check_resp("HTTP/1.0 200 OK\r\n\r\nhello", MAX, true, GW_RESP_DONE, GW_RESP_OK, 200, "hello");
    check_resp("HTTP/1.1 599 \r\nContent-Length: 0\r\n\r\n", MAX, false, GW_RESP_DONE, GW_RESP_OK, 599, "");
    /* bodyless statuses whatever their framing says */
    check_resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", MAX, false, GW_RESP_DONE, GW_RESP_OK, 304, "");
    check_resp("HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", MAX, false, GW_RESP_DONE, GW_RESP_OK, 204,
               "");
    /* interim responses, also with a body-like framing, HTTP/1.0 or
     * Connection: close (llhttp would swallow the final response) */
    check_resp("HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", MAX,
               false, GW_RESP_DONE, GW_RESP_OK, 200, "ok");
    check_resp("HTTP/1.0 103 Early\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", MAX, false, GW_RESP_DONE,
               GW_RESP_OK, 200, "ok");
    check_resp("HTTP/1.1 102 P\r\nConnection: close\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", MAX, false,
               GW_RESP_DONE, GW_RESP_OK, 200, "ok");
}

static void
test_invalid(void)
{
    static const char *const bad[] = {
        "HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 101 Switching\r\n\r\n",
        "HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        /* a chunk extension's name and value are never empty (llhttp 8 takes
         * both; found by test_backend_fuzz, seed 3994226351 case 1274) */
        CH "5;=x\r\nhello\r\n0\r\n\r\n",
        CH "5;f;=\"\"\r\nhello\r\n0\r\n\r\n",
        CH "5;a=\r\nhello\r\n0\r\n\r\n",
        /* llhttp takes a status of any number of digits up to 999 (found by
         * test_backend_fuzz: "0100" was an interim 100) */
        "HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 0100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n",
        "\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A: \x01\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\n",
        CH "zz\r\n",
        CH "5\r\nhelloXX0\r\n\r\n",
        /* llhttp takes any byte after the CR of a chunk size line for its LF
         * (found by test_backend_fuzz: "0\rX-Trailer" read as a trailer) */
        CH "5\rXhello\r\n0\r\n\r\n",
        CH "5;a=\"b\"\rXhello\r\n0\r\n\r\n",
        CH "5\r\nhello\r\n0\rX-Trailer: 1\r\n\r\n",
        CH "5\nhello\r\n0\r\n\r\n",
        CH "5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
        CH "5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        check_resp(bad[i], MAX, true, GW_RESP_ERROR, GW_RESP_BAD, 0, NULL);
}

static void
test_limits(void)
{
    /* chunk extensions: 4 KiB of names, values, ";" and "=" per chunk line */
    char *text = malloc(16384);
    snprintf(text, 16384, CH "5;x=%04093d\r\nhello\r\n0\r\n\r\n", 0); /* x, its ";", "=" and 4093: 4096 */
    check_resp(text, MAX, false, GW_RESP_DONE, GW_RESP_OK, 200, "hello");
    snprintf(text, 16384, CH "5;x=%04094d\r\nhello\r\n0\r\n\r\n", 0);
    check_resp(text, MAX, false, GW_RESP_ERROR, GW_RESP_BAD, 0, NULL);
    /* 32 interim heads pass, 33 do not */
    size_t n = 0;
    for (int i = 0; i < 33; i++)
        n += (size_t)snprintf(text + n, 16384 - n, "HTTP/1.1 102 P\r\n\r\n");
    snprintf(text + n, 16384 - n, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    check_resp(text, MAX, false, GW_RESP_ERROR, GW_RESP_BAD, 0, NULL);
    check_resp(text + strlen("HTTP/1.1 102 P\r\n\r\n"), MAX, false, GW_RESP_DONE, GW_RESP_OK, 200, "");
    free(text);
    /* sizes over max_body fail when they are read, before any body byte */
    check_resp("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", 10, false, GW_RESP_ERROR, GW_RESP_TOO_LARGE, 0, NULL);
    check_resp(CH "6\r\nhello!\r\n5\r\n", 10, false, GW_RESP_ERROR, GW_RESP_TOO_LARGE, 0, NULL);
    check_resp(CH "ffffffffffffffff\r\n", MAX, false, GW_RESP_ERROR, GW_RESP_TOO_LARGE, 0, NULL);
    check_resp("HTTP/1.1 200 OK\r\n\r\n0123456789x", 10, true, GW_RESP_ERROR, GW_RESP_TOO_LARGE, 0, NULL);
    check_resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", 10, false, GW_RESP_DONE, GW_RESP_OK, 200,
               "0123456789");
    /* cut short */
    check_resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", MAX, true, GW_RESP_ERROR, GW_RESP_TRUNCATED, 0,
               NULL);
    check_resp("HTTP/1.1 200 OK\r\nContent-Le", MAX, true, GW_RESP_ERROR, GW_RESP_TRUNCATED, 0, NULL);
    check_resp(CH "5\r\nhello\r\n", MAX, true, GW_RESP_ERROR, GW_RESP_TRUNCATED, 0, NULL);
}

/* A field name longer than gw_resp keeps of it (found by fuzz_response:
 * the copy of its start was computed past the buffer). */
static void
test_long_names(void)
{
    check_resp("HTTP/1.1 200 OK\r\nTransfer-Encoding-And-Much-More-Than-Twenty: x\r\nContent-Length: 0\r\n\r\n", MAX,
               false, GW_RESP_DONE, GW_RESP_OK, 200, "");
}

TEST_MAIN(T(test_valid), T(test_invalid), T(test_limits), T(test_long_names))
