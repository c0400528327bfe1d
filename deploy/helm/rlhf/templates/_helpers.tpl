{{/* Names, labels and the values every workload shares. */}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>, kept within 63 characters. */}}
{{- define "rlhf.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "rlhf.fullname" $root | trunc (int (sub 62 (len $component)))) $component | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource, except the selector labels. */}}
{{- define "rlhf.commonLabels" -}}
helm.sh/chart: {{ include "rlhf.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- end -}}

{{/* Labels of resources that are not a workload's (workloads add their selector labels). */}}
{{- define "rlhf.labels" -}}
{{ include "rlhf.commonLabels" . }}
app.kubernetes.io/name: {{ include "rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one workload: (list root component [stage]). */}}
{{- define "rlhf.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "rlhf.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- if gt (len .) 2 }}
rlhf.io/stage: {{ index . 2 }}
{{- end }}
{{- end -}}

{{- define "rlhf.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- include "rlhf.componentName" (list . "keys") -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.checkpointClaim" -}}
{{- if .Values.checkpoints.existingClaim -}}
{{- .Values.checkpoints.existingClaim -}}
{{- else -}}
{{- include "rlhf.componentName" (list . "checkpoints") -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.kafkaBootstrap" -}}
{{- if .Values.devBroker.enabled -}}
{{- if .Values.externalKafka.bootstrapServers -}}
{{- fail "devBroker.enabled and externalKafka.bootstrapServers are both set: use your Kafka cluster or the development broker, not both" -}}
{{- end -}}
{{- printf "%s.%s.svc:%v" (include "rlhf.componentName" (list . "broker")) .Release.Namespace .Values.devBroker.port -}}
{{- else -}}
{{- required "externalKafka.bootstrapServers is required: host:port[,host:port] of your Kafka brokers (this chart does not install Kafka; devBroker.enabled runs a throwaway one for trials)" .Values.externalKafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* The image of a workload: (list root gpuCount). GPU workloads run the CUDA variant. */}}
{{- define "rlhf.image" -}}
{{- $root := index . 0 -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag -}}
{{- if gt (int (index . 1)) 0 -}}
{{- $tag = printf "%s%s" $tag $root.Values.image.cudaTagSuffix -}}
{{- end -}}
{{- printf "%s:%s" $root.Values.image.repository $tag -}}
{{- end -}}

{{/* host:port of a component's gRPC Service inside the cluster. */}}
{{- define "rlhf.grpcAddress" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $port := index $root.Values $component "ports" "grpc" -}}
{{- printf "%s.%s.svc:%v" (include "rlhf.componentName" (list $root $component)) $root.Release.Namespace $port -}}
{{- end -}}

{{/* Settings of every workload serving gRPC (a JSON dict for its env): bind the pod's every
     interface (the services bind loopback by default), /metrics open or not, TLS, Kafka. */}}
{{- define "rlhf.serverEnv" -}}
{{- $env := dict "RLHF_GRPC_HOST" "0.0.0.0" "RLHF_METRICS_OPEN" (ternary "true" "false" .Values.monitoring.metricsOpen) -}}
{{- $env = merge $env (include "rlhf.tlsEnv" . | fromJson) (include "rlhf.kafkaEnv" . | fromJson) -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $env "RLHF_HEALTH_PORT" .Values.tls.healthPort -}}
{{- end -}}
{{- toJson $env -}}
{{- end -}}

{{/* TLS files and checks (tls.*), for servers and for clients such as the simulated users. */}}
{{- define "rlhf.tlsEnv" -}}
{{- $env := dict -}}
{{- $t := .Values.tls -}}
{{- if $t.enabled -}}
{{- if not $t.secretName -}}
{{- fail "tls.enabled needs tls.secretName: a Secret with tls.crt, tls.key and ca.crt (e.g. from cert-manager)" -}}
{{- end -}}
{{- $_ := set $env "RLHF_TLS_CERT_FILE" "/etc/rlhf/tls/tls.crt" -}}
{{- $_ := set $env "RLHF_TLS_KEY_FILE" "/etc/rlhf/tls/tls.key" -}}
{{- $_ := set $env "RLHF_TLS_CA_FILE" "/etc/rlhf/tls/ca.crt" -}}
{{- $_ := set $env "RLHF_TLS_CLIENT_AUTH" (ternary "true" "false" $t.clientAuth) -}}
{{- with $t.serverName -}}
{{- $_ := set $env "RLHF_TLS_SERVER_NAME" . -}}
{{- end -}}
{{- end -}}
{{- toJson $env -}}
{{- end -}}

{{/* How every Kafka client connects (externalKafka.securityProtocol, sasl, ssl). */}}
{{- define "rlhf.kafkaEnv" -}}
{{- $k := .Values.externalKafka -}}
{{- $env := dict "RLHF_KAFKA_SECURITY_PROTOCOL" $k.securityProtocol -}}
{{- if hasPrefix "SASL" $k.securityProtocol -}}
{{- if or (not $k.sasl.username) (not $k.sasl.passwordSecret.name) -}}
{{- fail (printf "externalKafka.securityProtocol=%s needs externalKafka.sasl.username and sasl.passwordSecret.name" $k.securityProtocol) -}}
{{- end -}}
{{- $_ := set $env "RLHF_KAFKA_SASL_MECHANISM" $k.sasl.mechanism -}}
{{- $_ := set $env "RLHF_KAFKA_SASL_USERNAME" $k.sasl.username -}}
{{- end -}}
{{- if hasSuffix "SSL" $k.securityProtocol -}}
{{- if $k.ssl.caSecret.name -}}
{{- $_ := set $env "RLHF_KAFKA_SSL_CA_FILE" "/etc/rlhf/kafka-ca/ca.crt" -}}
{{- end -}}
{{- if $k.ssl.clientCertSecret -}}
{{- $_ := set $env "RLHF_KAFKA_SSL_CERT_FILE" "/etc/rlhf/kafka-client/tls.crt" -}}
{{- $_ := set $env "RLHF_KAFKA_SSL_KEY_FILE" "/etc/rlhf/kafka-client/tls.key" -}}
{{- end -}}
{{- end -}}
{{- toJson $env -}}
{{- end -}}

{{/* The Kafka SASL password, from the Secret that holds it (a JSON list for secretEnv). */}}
{{- define "rlhf.kafkaSecretEnv" -}}
{{- $k := .Values.externalKafka -}}
{{- $list := list -}}
{{- if hasPrefix "SASL" $k.securityProtocol -}}
{{- $list = append $list (dict "name" "RLHF_KAFKA_SASL_PASSWORD" "key" $k.sasl.passwordSecret.key "secret" $k.sasl.passwordSecret.name) -}}
{{- end -}}
{{- toJson $list -}}
{{- end -}}

{{/* Keys every workload serving gRPC reads (a JSON list for secretEnv): the service, operator
     and reader keys it accepts; in a Secret of your own the last two may be missing. */}}
{{- define "rlhf.serverSecretEnv" -}}
{{- $optional := not (not .Values.secrets.existingSecret) -}}
{{- $list := list
  (dict "name" "RLHF_SERVICE_KEYS" "key" "service-keys")
  (dict "name" "RLHF_OPERATOR_KEYS" "key" "operator-keys" "optional" $optional)
  (dict "name" "RLHF_READER_KEYS" "key" "reader-keys" "optional" $optional)
-}}
{{- toJson (concat $list (include "rlhf.kafkaSecretEnv" . | fromJsonArray)) -}}
{{- end -}}

{{/* The TLS and Kafka certificate volumes (a JSON list of {volume, mount}). `kafka`: whether
     the workload talks to Kafka. */}}
{{- define "rlhf.securityVolumes" -}}
{{- $root := index . 0 -}}
{{- $kafka := index . 1 -}}
{{- $list := list -}}
{{- if $root.Values.tls.enabled -}}
{{- $list = append $list (dict
  "volume" (dict "name" "tls" "secret" (dict "secretName" $root.Values.tls.secretName))
  "mount" (dict "name" "tls" "mountPath" "/etc/rlhf/tls" "readOnly" true)) -}}
{{- end -}}
{{- $k := $root.Values.externalKafka -}}
{{- if and $kafka (hasSuffix "SSL" $k.securityProtocol) -}}
{{- if $k.ssl.caSecret.name -}}
{{- $list = append $list (dict
  "volume" (dict "name" "kafka-ca" "secret" (dict "secretName" $k.ssl.caSecret.name "items" (list (dict "key" $k.ssl.caSecret.key "path" "ca.crt"))))
  "mount" (dict "name" "kafka-ca" "mountPath" "/etc/rlhf/kafka-ca" "readOnly" true)) -}}
{{- end -}}
{{- if $k.ssl.clientCertSecret -}}
{{- $list = append $list (dict
  "volume" (dict "name" "kafka-client" "secret" (dict "secretName" $k.ssl.clientCertSecret))
  "mount" (dict "name" "kafka-client" "mountPath" "/etc/rlhf/kafka-client" "readOnly" true)) -}}
{{- end -}}
{{- end -}}
{{- toJson $list -}}
{{- end -}}
