/* Unit tests for src/gw_dns.c: the hosts file (format, case, final dot,
 * aliases, both families), round robin, addresses marked down, and a name
 * whose query is still out when it is freed (the cancelled callback is
 * reaped by gw_dns_free: the ASan build sees a leak otherwise). The DNS
 * side proper runs in tests/integration/test_dns.py against a DNS stub. */
#include "gw_config.h"
#include "gw_dns.h"
#include "gw_test.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

static char err[2048];
static char hosts_path[64];

/* A configuration whose resolver reads our hosts file and whose only
 * nameserver is a loopback port nobody answers on. */
static gw_config_t *
config(void)
{
    char text[1024];
    snprintf(text, sizeof(text),
             "{\"listen\": [\"1\"], \"resolver\": {\"nameservers\": [\"127.0.0.1:9\"], \"hosts_file\": \"%s\","
             " \"max_ttl_ms\": 60000}, \"backends\": {\"b\": {\"url\": \"http://web.test:8080\"}}}",
             hosts_path);
    gw_config_t *cfg = gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
    if (cfg == NULL)
        printf("    %s\n", err);
    return cfg;
}

static void
noop_cb(gw_dns_name_t *n, void *arg)
{
    GW_UNUSED(n);
    GW_UNUSED(arg);
}

static const char *
ip_of(const gw_dns_addr_t *a, char *buf, size_t len)
{
    if (a->sa.ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->sa)->sin_addr, buf, (socklen_t)len);
    else
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->sa)->sin6_addr, buf, (socklen_t)len);
    return buf;
}

static uint16_t
port_of(const gw_dns_addr_t *a)
{
    return ntohs(a->sa.ss_family == AF_INET ? ((const struct sockaddr_in *)&a->sa)->sin_port
                                            : ((const struct sockaddr_in6 *)&a->sa)->sin6_port);
}

static void
test_hosts_file_and_round_robin(void)
{
    gw_config_t *cfg = config();
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    struct event_base *base = event_base_new();
    gw_dns_t *dns = gw_dns_new(base, cfg, 0, err, sizeof(err));
    CHECK(dns != NULL);
    gw_dns_name_t n;
    /* any case, a final dot: the same name */
    gw_dns_name_init(&n, dns, "WEB.test.", 8080, noop_cb, NULL);
    const gw_dns_addr_t *a;
    size_t idx;
    char ip[64];
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK);
    CHECK(n.from_hosts && n.query == NULL && n.naddrs == 3);
    CHECK(n.ttl_ms == 60000 && n.expires > gw_dns_now_ms() + 50000);
    /* IPv4 entries first, in file order, duplicates once; then IPv6 */
    CHECK_STR(ip_of(&n.addrs[0], ip, sizeof(ip)), "127.0.0.3");
    CHECK_STR(ip_of(&n.addrs[1], ip, sizeof(ip)), "127.0.0.4");
    CHECK_STR(ip_of(&n.addrs[2], ip, sizeof(ip)), "::1");
    CHECK(port_of(&n.addrs[2]) == 8080);
    /* in turn */
    CHECK(idx == 0 && a == &n.addrs[0]);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 1);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    /* an address marked down is skipped while others are up */
    gw_dns_name_mark_down(&n, n.gen, 1);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    /* a mark for another generation of addresses is ignored */
    gw_dns_name_mark_down(&n, n.gen + 1, 0);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    /* all down: used in turn anyway (better a try than a certain failure) */
    gw_dns_name_mark_down(&n, n.gen, 0);
    gw_dns_name_mark_down(&n, n.gen, 2);
    size_t seen = 0;
    for (int i = 0; i < 3; i++) {
        CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK);
        seen |= (size_t)1 << idx;
    }
    CHECK(seen == 7);
    CHECK(gw_dns_name_has(&n, (const struct sockaddr *)&n.addrs[1].sa, n.addrs[1].len));
    struct sockaddr_in other = { .sin_family = AF_INET, .sin_port = htons(8080) };
    inet_pton(AF_INET, "127.0.0.9", &other.sin_addr);
    CHECK(!gw_dns_name_has(&n, (const struct sockaddr *)&other, sizeof(other)));
    char list[128];
    CHECK_STR(gw_dns_name_list(&n, list, sizeof(list)), "127.0.0.3, 127.0.0.4, [::1]");
    gw_dns_name_free(&n);

    /* aliases resolve; another worker starts its turn elsewhere */
    gw_dns_t *dns1 = gw_dns_new(base, cfg, 1, err, sizeof(err));
    gw_dns_name_init(&n, dns1, "alias.test", 80, noop_cb, NULL);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && n.naddrs == 2 && idx == 1);
    gw_dns_name_free(&n);
    /* a scoped address and a malformed line give nothing */
    gw_dns_name_init(&n, dns1, "scoped.test", 80, noop_cb, NULL);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_AGAIN); /* not in the file: a DNS query is out */
    CHECK(n.query != NULL && !n.from_hosts);
    gw_dns_name_free(&n); /* cancels it; gw_dns_free reaps the callback */
    gw_dns_free(dns1);
    gw_dns_free(dns);
    event_base_free(base);
    gw_config_unref(cfg);
}

static void
test_refresh_does_nothing_while_valid(void)
{
    gw_config_t *cfg = config();
    if (cfg == NULL)
        return;
    struct event_base *base = event_base_new();
    gw_dns_t *dns = gw_dns_new(base, cfg, 0, err, sizeof(err));
    gw_dns_name_t n;
    gw_dns_name_init(&n, dns, "web.test", 8080, noop_cb, NULL);
    gw_dns_name_refresh(&n); /* never resolved: resolves (from the file) */
    CHECK(n.naddrs == 3);
    unsigned gen = n.gen;
    uint64_t expires = n.expires;
    gw_dns_name_refresh(&n);
    CHECK(n.gen == gen && n.expires == expires && n.query == NULL);
    gw_dns_name_free(&n);
    gw_dns_free(dns);
    event_base_free(base);
    gw_config_unref(cfg);
}

TEST_MAIN(T(test_hosts_file_and_round_robin), T(test_refresh_does_nothing_while_valid))

/* The hosts file exists for the whole run (made before main's tests). */
__attribute__((constructor)) static void
make_hosts_file(void)
{
    snprintf(hosts_path, sizeof(hosts_path), "/tmp/gw-test-hosts-XXXXXX");
    int fd = mkstemp(hosts_path);
    if (fd < 0)
        return;
    static const char text[] = "# comment line\n"
                               "\n"
                               "127.0.0.3   web.test alias.test   # trailing comment\n"
                               "::1\tweb.test\talias.test\n"
                               "127.0.0.4 Web.Test\n"
                               "127.0.0.3 web.test\n"
                               "fe80::1%lo scoped.test\n"
                               "not-an-address scoped.test\n";
    if (write(fd, text, sizeof(text) - 1) < 0)
        perror("write");
    close(fd);
}

__attribute__((destructor)) static void
remove_hosts_file(void)
{
    unlink(hosts_path);
}
