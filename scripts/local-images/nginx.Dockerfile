# Stand-in for the official nginx image: renders /etc/nginx/templates/*.template
# into /etc/nginx/conf.d with envsubst (defined variables only), then runs nginx
# in the foreground, like the official image's entrypoint. Its workers run as
# the user `nginx`, as in the official image (Herald's nginx.conf names it).
ARG BASE
FROM ${BASE}
COPY nginx-entrypoint.sh /docker-entrypoint.sh
RUN chmod 0755 /docker-entrypoint.sh \
 && groupadd --system nginx \
 && useradd --system --gid nginx --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nginx \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["nginx", "-g", "daemon off;"]
