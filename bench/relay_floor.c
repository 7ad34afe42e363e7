/*
 * The kernel's floor for bench/proxy_sse.py: the least any relay pays per SSE event here.
 *
 * One epoll loop in C that copies bytes both ways between each client connection and its
 * own connection to the stand-in: no HTTP, no Python, no allocation per event. What it
 * costs per relayed event is the kernel's part (an epoll wakeup, one recv, one send, and
 * on loopback the receiving socket's TCP path run in the sender's context), so it tells
 * what no relay in this harness can go below, whatever its language.
 *
 *     cc -O2 -o relay_floor bench/relay_floor.c     (-DSPLICE: splice(2) through a pipe
 *     relay_floor LISTEN_PORT UPSTREAM_PORT          instead of recv and send; both on 127.0.0.1)
 *
 * Built and run by `python -m bench.proxy_sse`; not part of any image.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct end {
    int fd;
    int pipe[2]; /* -DSPLICE only */
    int dead;
    struct end *peer;
    struct end *next_dead;
};

static struct end *graveyard; /* freed after each epoll batch: a batch may name both ends */

static struct sockaddr_in addr_of(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void bury(int ep, struct end *e) {
    if (e->dead) return;
    e->dead = 1;
    epoll_ctl(ep, EPOLL_CTL_DEL, e->fd, NULL);
    close(e->fd);
    if (e->pipe[0]) close(e->pipe[0]), close(e->pipe[1]);
    e->next_dead = graveyard;
    graveyard = e;
}

/* Blocks until the peer takes everything: a paced stream never fills a socket buffer. */
static int send_all(int fd, const char *buf, ssize_t n) {
    while (n > 0) {
        ssize_t w = send(fd, buf, (size_t)n, MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, -1);
            continue;
        }
        if (w <= 0) return -1;
        buf += w;
        n -= w;
    }
    return 0;
}

static void watch(int ep, struct end *e) {
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = e};
    fcntl(e->fd, F_SETFL, O_NONBLOCK);
    epoll_ctl(ep, EPOLL_CTL_ADD, e->fd, &ev);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in listen_at = addr_of(atoi(argv[1])), upstream = addr_of(atoi(argv[2]));
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&listen_at, sizeof listen_at) || listen(lfd, 1024)) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct end listener = {.fd = lfd};
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    static char buf[65536];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            struct end *e = events[i].data.ptr;
            if (e == &listener) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd < 0) continue;
                int ufd = socket(AF_INET, SOCK_STREAM, 0);
                if (connect(ufd, (struct sockaddr *)&upstream, sizeof upstream)) {
                    close(cfd);
                    close(ufd);
                    continue;
                }
                setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct end *c = calloc(1, sizeof *c), *u = calloc(1, sizeof *u);
                c->fd = cfd, u->fd = ufd, c->peer = u, u->peer = c;
                watch(ep, c);
                watch(ep, u);
                continue;
            }
            if (e->dead) continue;
#ifdef SPLICE
            if (!e->pipe[0] && pipe(e->pipe)) return 1;
            ssize_t moved = splice(e->fd, NULL, e->pipe[1], NULL, sizeof buf,
                                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (moved < 0 && errno == EAGAIN) continue;
            if (moved <= 0 ||
                splice(e->pipe[0], NULL, e->peer->fd, NULL, moved, SPLICE_F_MOVE) != moved) {
                bury(ep, e);
                bury(ep, e->peer);
            }
            continue;
#endif
            ssize_t got = recv(e->fd, buf, sizeof buf, 0);
            if (got < 0 && errno == EAGAIN) continue;
            if (got <= 0 || send_all(e->peer->fd, buf, got)) {
                bury(ep, e);
                bury(ep, e->peer);
            }
        }
        while (graveyard) {
            struct end *e = graveyard;
            graveyard = e->next_dead;
            free(e);
        }
    }
}
