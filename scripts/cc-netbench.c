/*
 * cc-netbench: the guest end of `crumble bench net`, a static program that
 * moves bytes in 1 MiB system calls, so that what the bench measures is the
 * path between guest and host, not the guest program (busybox nc copies
 * 1 KiB per system call, with a poll before each, and under emulation that
 * alone caps a transfer well below what the forwarding carries).
 *
 *   cc-netbench send HOST:PORT MIB   connect, write MIB MiB of zeros, half
 *                                    close, wait for the peer to close
 *   cc-netbench recv PORT            accept one connection on 0.0.0.0:PORT,
 *                                    read it to its end, print the count
 *   cc-netbench write MIB            write MIB MiB of zeros to stdout
 *   cc-netbench read                 read stdin to its end, print the count
 *
 * HOST is an IPv4 address or a name in /etc/hosts (host.internal): a
 * static glibc cannot resolve names through NSS in an image without it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static char buf[CHUNK];

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* Writes `mib` MiB of zeros to `fd`. */
static void put(int fd, long mib)
{
    for (long i = 0; i < mib; i++) {
        size_t off = 0;
        while (off < CHUNK) {
            ssize_t n = write(fd, buf + off, CHUNK - off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("write");
            off += (size_t)n;
        }
    }
}

/* Reads `fd` to its end; returns how many bytes came. */
static long long drain(int fd)
{
    long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read");
        if (n == 0)
            return total;
        total += n;
    }
}

/* `name` as an IPv4 address, directly or through /etc/hosts. */
static struct in_addr resolve(const char *name)
{
    struct in_addr addr;
    if (inet_pton(AF_INET, name, &addr) == 1)
        return addr;
    FILE *hosts = fopen("/etc/hosts", "r");
    char line[512];
    while (hosts && fgets(line, sizeof line, hosts)) {
        char *save, *ip = strtok_r(line, " \t\n", &save), *alias;
        if (!ip || ip[0] == '#')
            continue;
        while ((alias = strtok_r(NULL, " \t\n", &save)))
            if (strcmp(alias, name) == 0 && inet_pton(AF_INET, ip, &addr) == 1)
                return addr;
    }
    fprintf(stderr, "cc-netbench: cannot resolve %s\n", name);
    exit(1);
}

static int tcp_socket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    return fd;
}

static int usage(void)
{
    fputs("usage: cc-netbench send HOST:PORT MIB | recv PORT | write MIB | read\n", stderr);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "send") == 0) {
        char *colon = strrchr(argv[2], ':');
        if (!colon)
            return usage();
        *colon = 0;
        struct sockaddr_in to = {.sin_family = AF_INET,
                                 .sin_port = htons((unsigned short)atoi(colon + 1)),
                                 .sin_addr = resolve(argv[2])};
        int fd = tcp_socket();
        if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
            die("connect");
        put(fd, atol(argv[3]));
        /* Half close, then wait for the reader's close: exiting at once
         * could reset a connection whose bytes are still in flight. */
        if (shutdown(fd, SHUT_WR) < 0)
            die("shutdown");
        drain(fd);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "recv") == 0) {
        int fd = tcp_socket(), one = 1;
        struct sockaddr_in at = {.sin_family = AF_INET,
                                 .sin_port = htons((unsigned short)atoi(argv[2])),
                                 .sin_addr.s_addr = htonl(INADDR_ANY)};
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&at, sizeof at) < 0 || listen(fd, 1) < 0)
            die("listen");
        int conn = accept(fd, NULL, NULL);
        if (conn < 0)
            die("accept");
        printf("%lld\n", drain(conn));
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "write") == 0) {
        put(1, atol(argv[2]));
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "read") == 0) {
        printf("%lld\n", drain(0));
        return 0;
    }
    return usage();
}
