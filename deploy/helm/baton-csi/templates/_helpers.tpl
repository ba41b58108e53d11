{{- define "baton-csi.name" -}}baton-csi{{- end -}}

{{- define "baton-csi.fullname" -}}
{{- if contains "baton-csi" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-baton-csi" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "baton-csi.labels" -}}
app.kubernetes.io/name: baton-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "baton-csi.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "baton-csi.mountImage" -}}
{{ default (include "baton-csi.image" .) .Values.mountPod.image }}
{{- end -}}

{{/* "true" when the node plugin watches for upgrade annotations, else empty. */}}
{{- define "baton-csi.upgradeWatch" -}}
{{- if or (eq .Values.node.upgradeWatch "on") (and (eq .Values.node.upgradeWatch "auto") (eq .Values.node.mountMode "pod")) -}}
true
{{- end -}}
{{- end }}
