/* Unit tests for src/gw_proxy.c: the upstream request target. */
#include "gw_http.h"
#include "gw_proxy.h"
#include "gw_test.h"

static gw_http_limits_t limits = {
    .max_header_bytes = 4096, .max_headers = 50, .max_url_bytes = 4096, .max_body_bytes = 64,
};

static void
check_target(const char *url, size_t strip, const char *expect)
{
    char reqtext[512];
    snprintf(reqtext, sizeof(reqtext), "GET %s HTTP/1.1\r\nHost: h\r\n\r\n", url);
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    size_t used;
    CHECK(gw_parser_execute(&p, reqtext, strlen(reqtext), &used) == GW_PARSE_DONE);
    char out[256];
    size_t n = gw_proxy_target(&r, strip, out, sizeof(out));
    CHECK(n == strlen(expect));
    CHECK_STR(out, expect);
    gw_parser_free(&p);
}

static void
test_targets(void)
{
    check_target("/legacy/users/42?x=1&y=%20", 1, "/users/42?x=1&y=%20");
    check_target("/legacy", 1, "/");
    check_target("/legacy/", 1, "/");
    check_target("/legacy/dir/", 1, "/dir/");
    check_target("/a//b/./c/../d", 0, "/a/b/d");
    check_target("/a/x%2Fy", 0, "/a/x%2Fy");             /* an encoded slash stays one segment */
    check_target("/a/%2e%2e%2Fetc", 0, "/a/..%2Fetc");   /* decoded "..", kept inside its segment */
    check_target("/caf%C3%A9/a%20b", 0, "/caf%C3%A9/a%20b");
    check_target("/x/:@!$&'()*+,;=-._~", 0, "/x/:@!$&'()*+,;=-._~");
    check_target("/q%3Fx%23y", 0, "/q%3Fx%23y");         /* ? and # never leave their segment */
}

static void
test_target_too_long(void)
{
    char reqtext[512];
    snprintf(reqtext, sizeof(reqtext), "GET /%0200d HTTP/1.1\r\nHost: h\r\n\r\n", 0);
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    size_t used;
    CHECK(gw_parser_execute(&p, reqtext, strlen(reqtext), &used) == GW_PARSE_DONE);
    char out[64];
    CHECK(gw_proxy_target(&r, 0, out, sizeof(out)) == 0);
    gw_parser_free(&p);
}

TEST_MAIN(T(test_targets), T(test_target_too_long))
