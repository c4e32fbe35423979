#!/usr/bin/perl
# SysV IPC example app: a semaphore set, a message queue and a shared-memory segment that only
# this running app holds; prints what it reads back from them every tick.
use strict; use warnings;
$| = 1;
my ($IPC_PRIVATE, $IPC_CREAT, $GETVAL, $SETVAL, $IPC_NOWAIT) = (0, 01000, 12, 16, 04000);
my $sem = semget($IPC_PRIVATE, 2, $IPC_CREAT | 0600) // die "semget: $!";
semctl($sem, 1, $SETVAL, 41) // die "semctl: $!";   # a value only this app set
my $msq = msgget($IPC_PRIVATE, $IPC_CREAT | 0600) // die "msgget: $!";
my $shm = shmget($IPC_PRIVATE, 4096, $IPC_CREAT | 0600) // die "shmget: $!";
my $n = 0;
while (1) {
    $n++;
    semop($sem, pack("s!s!s!", 0, 1, 0)) || die "semop: $!";
    msgsnd($msq, pack("l! a*", 1, "m$n"), 0) || die "msgsnd: $!";
    my $got = "-";
    if ($n > 3) {
        my $buf;
        msgrcv($msq, $buf, 64, 0, $IPC_NOWAIT) // die "msgrcv: $!";
        (undef, $got) = unpack("l! a*", $buf);
    }
    shmwrite($shm, sprintf("%-16d", $n), 0, 16) || die "shmwrite: $!";
    my $mem; shmread($shm, $mem, 0, 16) || die "shmread: $!";
    $mem =~ s/\s+$//;
    printf "events=%d sem=%d mark=%d msg=%s shm=%s\n", $n, semctl($sem, 0, $GETVAL, 0), semctl($sem, 1, $GETVAL, 0), $got, $mem;
    sleep 1;
}
