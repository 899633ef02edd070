/*
 * gw_notify.c - sd_notify over $NOTIFY_SOCKET, see gw_notify.h.
 *
 * The protocol is a single datagram of newline-separated KEY=VALUE pairs on
 * an AF_UNIX SOCK_DGRAM socket; it needs no library. Sending never blocks
 * (MSG_DONTWAIT): a service manager that does not read its queue must not
 * stall signal handling in the main thread.
 */
#include "gw_notify.h"

#include "gw_log.h"

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int notify_fd = -1;
static struct sockaddr_un notify_addr;
static socklen_t notify_addrlen;
static char notify_name[sizeof(notify_addr.sun_path) + 1]; /* for log lines */

int
gw_notify_init(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    if (s == NULL || *s == '\0')
        return GW_OK;
    size_t len = strlen(s);
    if ((s[0] != '/' && s[0] != '@') || len < 2 || len > sizeof(notify_addr.sun_path)) {
        gw_log(GW_LOG_WARN,
               "NOTIFY_SOCKET \"%s\" is not an absolute path or an @abstract name "
               "of at most %zu bytes: readiness notifications are off",
               s, sizeof(notify_addr.sun_path));
        return GW_ERR;
    }
    memset(&notify_addr, 0, sizeof(notify_addr));
    notify_addr.sun_family = AF_UNIX;
    memcpy(notify_addr.sun_path, s, len);
    if (s[0] == '@')
        notify_addr.sun_path[0] = '\0'; /* abstract: the length, not a NUL, ends the name */
    notify_addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (s[0] == '/' ? 1 : 0));
    if (notify_addrlen > sizeof(notify_addr))
        notify_addrlen = sizeof(notify_addr);
    snprintf(notify_name, sizeof(notify_name), "%s", s);
    notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (notify_fd < 0) {
        gw_log(GW_LOG_WARN, "cannot create a socket for NOTIFY_SOCKET %s: %s: readiness notifications are off",
               notify_name, strerror(errno));
        return GW_ERR;
    }
    return GW_OK;
}

int
gw_notify_send(const char *msg)
{
    if (notify_fd < 0)
        return GW_OK;
    size_t len = strlen(msg);
    ssize_t n;
    do
        n = sendto(notify_fd, msg, len, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&notify_addr,
                   notify_addrlen);
    while (n < 0 && errno == EINTR);
    if (n < 0 || (size_t)n != len) {
        gw_log(GW_LOG_WARN, "cannot notify the service manager on %s (%.*s): %s", notify_name, (int)strcspn(msg, "\n"),
               msg, n < 0 ? strerror(errno) : "short send");
        return GW_ERR;
    }
    gw_log(GW_LOG_DEBUG, "notified the service manager: %.*s", (int)strcspn(msg, "\n"), msg);
    return GW_OK;
}

int
gw_notify_ready(void)
{
    char msg[64];
    snprintf(msg, sizeof(msg), "READY=1\nMAINPID=%ld", (long)getpid());
    return gw_notify_send(msg);
}

int
gw_notify_reloading(void)
{
    char msg[80];
    snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%" PRIu64, gw_now_us());
    return gw_notify_send(msg);
}

int
gw_notify_reloaded(void)
{
    return gw_notify_send("READY=1");
}

int
gw_notify_stopping(void)
{
    return gw_notify_send("STOPPING=1");
}

void
gw_notify_close(void)
{
    if (notify_fd >= 0)
        close(notify_fd);
    notify_fd = -1;
}
